//! Error text that sinks store and the CLI shows.

/// The innermost cause of an error (`connection refused`), not the outer
/// message, which in HTTP clients quotes the URL (and with it, sometimes,
/// a token in the query).
pub fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = err;
    while let Some(source) = cause.source() {
        cause = source;
    }
    let text = cause.to_string();
    // "Connection refused (os error 111)" -> "connection refused"
    let text = match text.rfind(" (os error ") {
        Some(at) if text.ends_with(')') => &text[..at],
        _ => &text,
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::from("unknown error"),
    }
}

/// Text as one line of at most `most` characters: control characters
/// (line breaks, NULs, escapes) become spaces, so it cannot forge log lines
/// nor be refused by a database, and a longer text ends in `...`. Borrowed
/// when it is clean already.
pub fn one_line(text: &str, most: usize) -> std::borrow::Cow<'_, str> {
    if text.chars().all(|c| !c.is_control()) && text.len() <= most {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out: String = text
        .chars()
        .take(most)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().nth(most).is_some() {
        out.push_str("...");
    }
    std::borrow::Cow::Owned(out)
}

/// `text` with each of `secrets` written as `[redacted]`, the longest first
/// (one may hold another): for a message that may quote what a sink was
/// configured with. The caller picks what counts as a secret.
pub fn redact<'s>(text: &str, secrets: impl IntoIterator<Item = &'s str>) -> String {
    let mut secrets: Vec<&str> = secrets.into_iter().filter(|s| !s.is_empty()).collect();
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    let mut out = text.to_owned();
    for secret in secrets {
        if out.contains(secret) {
            out = out.replace(secret, "[redacted]");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_hides_each_secret_the_longest_first() {
        assert_eq!(
            redact("key abc, url http://u:abc@h", ["abc", "http://u:abc@h", ""]),
            "key [redacted], url [redacted]"
        );
        assert_eq!(redact("nothing here", ["secret"]), "nothing here");
    }

    #[derive(Debug)]
    struct Outer(std::io::Error);
    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("error sending request for url (https://kds.example.com/?token=secret)")
        }
    }
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn innermost_cause_without_the_url() {
        let err = Outer(std::io::Error::from_raw_os_error(111));
        assert_eq!(root_cause(&err), "connection refused");
    }
}
