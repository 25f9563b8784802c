//! Signature verification of incoming webhooks, on the raw body bytes, in
//! constant time.
//!
//! Every source kind has a [`Verify`] implementation. The only way to obtain a
//! [`Verified`] body is to pass verification, so code that parses or stores a
//! body can demand one and cannot be handed unverified bytes by mistake.
//!
//! # Order of checks
//!
//! 1. the signature header is located and parsed (`missing_header`,
//!    `malformed_header`);
//! 2. the MAC is checked (`mismatch`);
//! 3. only then is the timestamp window enforced (`timestamp_out_of_tolerance`).
//!
//! Checking the MAC before the window means `timestamp_out_of_tolerance` is
//! only ever reported for requests that really were signed with one of our
//! secrets: that metric measures replays and clock skew (NTP!), not the noise of
//! forged requests, which always count as `mismatch`. The client sees 401 in
//! every case, so the order leaks nothing to it. The cost is one HMAC per
//! configured secret over a body that has already been read and size-limited.
//!
//! # Malformed versus mismatch
//!
//! A header that is absent is `missing_header`. A header that cannot be read
//! at all (not visible ASCII, repeated, empty, a CrumbPOS header with no `t` or
//! no `v1`, a non-numeric timestamp, a missing configured prefix) is
//! `malformed_header`. A signature value that is present but is not valid
//! hex/base64 (for example Crave's header with a `sha256=` prefix, which is not
//! part of Crave's scheme) can simply never match, so it is `mismatch`.
//!
//! Secrets never reach `Debug` output, errors or logs: [`Secret`] prints as
//! `Secret(***)`, and [`VerifyError`] carries no data.

use std::fmt;
use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use http::{HeaderMap, HeaderName};
use sha2::Sha256;
use subtle::{Choice, ConstantTimeEq};

type HmacSha256 = Hmac<Sha256>;

/// Length in bytes of an HMAC-SHA256 tag.
const TAG_LEN: usize = 32;

/// The CrumbPOS signature header.
pub const CRUMB_SIGNATURE: HeaderName = HeaderName::from_static("crumb-signature");
/// The Crave signature header.
pub const CRAVE_SIGNATURE: HeaderName = HeaderName::from_static("x-crave-signature");
/// The default replay window (CrumbPOS documents 5 minutes).
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(300);

/// A webhook signing secret. Never printed: `Debug` shows `Secret(***)` and
/// there is deliberately no `Display`.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(secret: String) -> Self {
        Secret(secret)
    }

    /// The key bytes, for computing a MAC.
    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Why a request failed verification. Carries no data on purpose: no secret,
/// no body, no header value can leak through it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("signature header missing")]
    MissingHeader,
    #[error("signature header malformed")]
    MalformedHeader,
    #[error("signature mismatch")]
    Mismatch,
    #[error("signature timestamp outside tolerance")]
    TimestampOutOfTolerance,
}

impl VerifyError {
    /// A low-cardinality label for metrics and logs.
    pub fn reason(self) -> &'static str {
        match self {
            VerifyError::MissingHeader => "missing_header",
            VerifyError::MalformedHeader => "malformed_header",
            VerifyError::Mismatch => "mismatch",
            VerifyError::TimestampOutOfTolerance => "timestamp_out_of_tolerance",
        }
    }
}

/// Proof that `body` passed signature verification. Only this module can
/// construct one.
#[derive(Clone, Copy)]
pub struct Verified<'a> {
    body: &'a [u8],
}

impl<'a> Verified<'a> {
    fn new(body: &'a [u8]) -> Self {
        Verified { body }
    }

    /// The verified raw body.
    pub fn body(&self) -> &'a [u8] {
        self.body
    }
}

impl fmt::Debug for Verified<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The body is not printed, only its size.
        f.debug_struct("Verified").field("body_len", &self.body.len()).finish()
    }
}

/// A source's signature scheme.
pub trait Verify: Send + Sync + fmt::Debug {
    /// Checks `body` (the raw bytes as received) against `headers`, with
    /// `now_unix` as the current time for replay windows.
    fn verify<'a>(&self, headers: &HeaderMap, body: &'a [u8], now_unix: i64) -> Result<Verified<'a>, VerifyError>;
}

// ---------------------------------------------------------------------------
// Shared helpers

fn new_mac(key: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length; this cannot fail.
    <HmacSha256 as KeyInit>::new_from_slice(key).expect("HMAC accepts keys of any length")
}

/// HMAC-SHA256 over the concatenation of `parts`, without copying them.
fn mac_parts(key: &[u8], parts: &[&[u8]]) -> [u8; TAG_LEN] {
    let mut mac = new_mac(key);
    for part in parts {
        Mac::update(&mut mac, part);
    }
    let mut out = [0u8; TAG_LEN];
    out.copy_from_slice(&mac.finalize().into_bytes());
    out
}

/// Constant-time: does any candidate equal any expected tag? Every pair is
/// compared (no early exit), so timing does not reveal which secret or which
/// candidate matched, nor where a candidate differs.
fn any_matches(expected: &[[u8; TAG_LEN]], candidates: &[Option<[u8; TAG_LEN]>]) -> bool {
    let mut ok = Choice::from(0u8);
    for cand in candidates.iter().flatten() {
        for tag in expected {
            ok |= tag.as_slice().ct_eq(cand.as_slice());
        }
    }
    bool::from(ok)
}

/// The single value of header `name`: absent -> MissingHeader; repeated,
/// not visible ASCII or empty -> MalformedHeader. Surrounding whitespace is
/// trimmed.
fn single_header<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Result<&'h str, VerifyError> {
    let mut values = headers.get_all(name).iter();
    let value = values.next().ok_or(VerifyError::MissingHeader)?;
    if values.next().is_some() {
        return Err(VerifyError::MalformedHeader);
    }
    let value = value.to_str().map_err(|_| VerifyError::MalformedHeader)?.trim();
    if value.is_empty() {
        return Err(VerifyError::MalformedHeader);
    }
    Ok(value)
}

/// A unix timestamp in seconds: ASCII digits only (no sign, no spaces).
fn parse_unix(text: &str) -> Result<i64, VerifyError> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(VerifyError::MalformedHeader);
    }
    text.parse::<i64>().map_err(|_| VerifyError::MalformedHeader)
}

fn within_tolerance(t: i64, now_unix: i64, tolerance: Duration) -> Result<(), VerifyError> {
    if Duration::from_secs(now_unix.abs_diff(t)) > tolerance {
        Err(VerifyError::TimestampOutOfTolerance)
    } else {
        Ok(())
    }
}

/// Hex (either case) to a 32-byte tag; anything else is `None` (a value that
/// cannot match).
fn decode_hex_tag(text: &str) -> Option<[u8; TAG_LEN]> {
    let mut out = [0u8; TAG_LEN];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

/// Standard base64, padded or not, to a 32-byte tag.
fn decode_base64_tag(text: &str) -> Option<[u8; TAG_LEN]> {
    const ENGINE: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let bytes = ENGINE.decode(text).ok()?;
    bytes.try_into().ok()
}

// ---------------------------------------------------------------------------
// CrumbPOS

/// `Crumb-Signature: t=<unix>,v1=<hex>[,v1=<hex>...]`, HMAC-SHA256 over
/// `"<t>.<raw body>"`, replay window `tolerance`.
#[derive(Debug, Clone)]
pub struct CrumbPosVerifier {
    pub secrets: Vec<Secret>,
    pub tolerance: Duration,
}

impl CrumbPosVerifier {
    pub fn new(secrets: Vec<Secret>, tolerance: Duration) -> Self {
        CrumbPosVerifier { secrets, tolerance }
    }
}

/// A parsed `Crumb-Signature` header.
struct CrumbHeader<'h> {
    /// The timestamp exactly as sent: it is what the vendor signed.
    t_text: &'h str,
    t: i64,
    v1: Vec<Option<[u8; TAG_LEN]>>,
}

/// Parts separated by `,`, each `key=value` with optional whitespace; parts
/// in any order; unknown keys ignored; empty parts ignored; exactly one `t`;
/// at least one `v1` (non-hex ones are kept as non-matching).
fn parse_crumb_header(value: &str) -> Result<CrumbHeader<'_>, VerifyError> {
    let mut t_text = None;
    let mut v1 = Vec::new();
    for part in value.split(',') {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        let (key, val) = part.split_once('=').ok_or(VerifyError::MalformedHeader)?;
        let (key, val) = (key.trim(), val.trim());
        match key {
            // A second `t` is ambiguous.
            "t" if t_text.is_some() => return Err(VerifyError::MalformedHeader),
            "t" => t_text = Some(val),
            "v1" => v1.push(decode_hex_tag(val)),
            _ => {}
        }
    }
    let t_text = t_text.ok_or(VerifyError::MalformedHeader)?;
    let t = parse_unix(t_text)?;
    if v1.is_empty() {
        return Err(VerifyError::MalformedHeader);
    }
    Ok(CrumbHeader { t_text, t, v1 })
}

impl Verify for CrumbPosVerifier {
    fn verify<'a>(&self, headers: &HeaderMap, body: &'a [u8], now_unix: i64) -> Result<Verified<'a>, VerifyError> {
        let header = parse_crumb_header(single_header(headers, &CRUMB_SIGNATURE)?)?;
        let expected: Vec<[u8; TAG_LEN]> = self
            .secrets
            .iter()
            .map(|s| mac_parts(s.expose(), &[header.t_text.as_bytes(), b".", body]))
            .collect();
        if !any_matches(&expected, &header.v1) {
            return Err(VerifyError::Mismatch);
        }
        within_tolerance(header.t, now_unix, self.tolerance)?;
        Ok(Verified::new(body))
    }
}

/// The full `Crumb-Signature` header value for `body` signed at `t`.
pub fn sign_crumbpos(secret: &[u8], t: i64, body: &[u8]) -> String {
    let t = t.to_string();
    let tag = mac_parts(secret, &[t.as_bytes(), b".", body]);
    format!("t={t},v1={}", hex::encode(tag))
}

// ---------------------------------------------------------------------------
// Crave

/// `X-Crave-Signature: <hex>` = HMAC-SHA256(secret, raw body); no timestamp
/// (dedupe by event id is the replay defence).
#[derive(Debug, Clone)]
pub struct CraveVerifier {
    pub secrets: Vec<Secret>,
}

impl CraveVerifier {
    pub fn new(secrets: Vec<Secret>) -> Self {
        CraveVerifier { secrets }
    }
}

impl Verify for CraveVerifier {
    fn verify<'a>(&self, headers: &HeaderMap, body: &'a [u8], _now_unix: i64) -> Result<Verified<'a>, VerifyError> {
        let value = single_header(headers, &CRAVE_SIGNATURE)?;
        // Upper or lower case hex. Anything else (including a `sha256=`
        // prefix, which is not Crave's scheme) cannot match.
        let candidate = [decode_hex_tag(value)];
        let expected: Vec<[u8; TAG_LEN]> = self.secrets.iter().map(|s| mac_parts(s.expose(), &[body])).collect();
        if !any_matches(&expected, &candidate) {
            return Err(VerifyError::Mismatch);
        }
        Ok(Verified::new(body))
    }
}

/// The `X-Crave-Signature` header value (lower-case hex) for `body`.
pub fn sign_crave(secret: &[u8], body: &[u8]) -> String {
    hex::encode(mac_parts(secret, &[body]))
}

// ---------------------------------------------------------------------------
// Configurable HMAC

/// How the MAC is written in the signature header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoding {
    /// Hex, either case accepted, lower case produced.
    #[default]
    Hex,
    /// Standard base64 (`+/`), padded or not accepted, padded produced.
    Base64,
}

impl Encoding {
    /// `"hex"` or `"base64"`.
    pub fn parse(s: &str) -> Result<Encoding, String> {
        match s {
            "hex" => Ok(Encoding::Hex),
            "base64" => Ok(Encoding::Base64),
            other => Err(format!("unknown encoding {other:?}; expected \"hex\" or \"base64\"")),
        }
    }

    fn decode(self, text: &str) -> Option<[u8; TAG_LEN]> {
        match self {
            Encoding::Hex => decode_hex_tag(text),
            Encoding::Base64 => decode_base64_tag(text),
        }
    }

    fn encode(self, tag: &[u8]) -> String {
        match self {
            Encoding::Hex => hex::encode(tag),
            Encoding::Base64 => base64::engine::general_purpose::STANDARD.encode(tag),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Literal(String),
    Timestamp,
    Body,
}

/// What is signed, from a template such as `"{body}"`,
/// `"{timestamp}.{body}"` or `"v0:{timestamp}:{body}"`. `{body}` (the raw
/// body) must occur exactly once; `{timestamp}` (the timestamp header's value
/// exactly as sent) may occur; any other text is literal. A `{` that does not
/// open one of the two placeholders is an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedPayload {
    pieces: Vec<Piece>,
}

impl Default for SignedPayload {
    /// `"{body}"`.
    fn default() -> Self {
        SignedPayload {
            pieces: vec![Piece::Body],
        }
    }
}

impl SignedPayload {
    /// `"{timestamp}.{body}"`, the default when a timestamp header is set.
    pub fn timestamp_dot_body() -> Self {
        SignedPayload {
            pieces: vec![Piece::Timestamp, Piece::Literal(".".to_owned()), Piece::Body],
        }
    }

    pub fn parse(template: &str) -> Result<SignedPayload, String> {
        let mut pieces = Vec::new();
        let mut literal = String::new();
        let mut bodies = 0;
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            literal.push_str(&rest[..open]);
            let after = &rest[open..];
            let (piece, len) = if after.starts_with("{body}") {
                (Piece::Body, "{body}".len())
            } else if after.starts_with("{timestamp}") {
                (Piece::Timestamp, "{timestamp}".len())
            } else {
                let shown: String = after.chars().take_while(|&c| c != '}').take(32).collect();
                return Err(format!(
                    "unknown placeholder starting {shown:?}; only {{body}} and {{timestamp}} are allowed"
                ));
            };
            if !literal.is_empty() {
                pieces.push(Piece::Literal(std::mem::take(&mut literal)));
            }
            if piece == Piece::Body {
                bodies += 1;
            }
            pieces.push(piece);
            rest = &after[len..];
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            pieces.push(Piece::Literal(literal));
        }
        match bodies {
            0 => Err("the signed payload must contain {body}".to_owned()),
            1 => Ok(SignedPayload { pieces }),
            _ => Err("{body} may appear only once in the signed payload".to_owned()),
        }
    }

    /// Whether the template contains `{timestamp}` (then a timestamp header
    /// is required).
    pub fn uses_timestamp(&self) -> bool {
        self.pieces.contains(&Piece::Timestamp)
    }

    fn mac(&self, key: &[u8], timestamp: &str, body: &[u8]) -> [u8; TAG_LEN] {
        let mut mac = new_mac(key);
        for piece in &self.pieces {
            let bytes: &[u8] = match piece {
                Piece::Literal(text) => text.as_bytes(),
                Piece::Timestamp => timestamp.as_bytes(),
                Piece::Body => body,
            };
            Mac::update(&mut mac, bytes);
        }
        let mut out = [0u8; TAG_LEN];
        out.copy_from_slice(&mac.finalize().into_bytes());
        out
    }
}

impl fmt::Display for SignedPayload {
    /// The template back, e.g. `{timestamp}.{body}`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for piece in &self.pieces {
            match piece {
                Piece::Literal(text) => f.write_str(text)?,
                Piece::Timestamp => f.write_str("{timestamp}")?,
                Piece::Body => f.write_str("{body}")?,
            }
        }
        Ok(())
    }
}

/// The configurable `hmac` source kind: HMAC-SHA256 in a header of your
/// choice.
#[derive(Debug, Clone)]
pub struct HmacVerifier {
    pub secrets: Vec<Secret>,
    /// The header carrying the signature.
    pub header: HeaderName,
    pub encoding: Encoding,
    /// Stripped from the header value (ASCII case-insensitively) before
    /// decoding, e.g. `sha256=`; when set and absent: `MalformedHeader`.
    pub prefix: Option<String>,
    /// A header carrying unix seconds; when set, `tolerance` is enforced.
    pub timestamp_header: Option<HeaderName>,
    pub signed: SignedPayload,
    pub tolerance: Duration,
}

impl HmacVerifier {
    /// A configuration error, if any: `{timestamp}` in `signed` without a
    /// `timestamp_header`. (A `timestamp_header` whose value is not signed is
    /// allowed but only bounds the request's claimed age.)
    pub fn check(&self) -> Result<(), String> {
        if self.signed.uses_timestamp() && self.timestamp_header.is_none() {
            return Err(format!(
                "signed = \"{}\" uses {{timestamp}} but no timestamp_header is set",
                self.signed
            ));
        }
        Ok(())
    }

    /// The headers to set on a request carrying `body`, signed with `secret`
    /// at time `t` (unix seconds; `None` = now). The timestamp header is
    /// included when one is configured.
    pub fn sign(&self, secret: &[u8], t: Option<i64>, body: &[u8]) -> Vec<(HeaderName, String)> {
        let t = t.unwrap_or_else(|| jiff::Timestamp::now().as_second()).to_string();
        let tag = self.signed.mac(secret, &t, body);
        let mut value = self.prefix.clone().unwrap_or_default();
        value.push_str(&self.encoding.encode(&tag));
        let mut headers = vec![(self.header.clone(), value)];
        if let Some(name) = &self.timestamp_header {
            headers.push((name.clone(), t));
        }
        headers
    }
}

/// Strips `prefix` ASCII case-insensitively.
fn strip_prefix_ci<'v>(value: &'v str, prefix: &str) -> Option<&'v str> {
    let head = value.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &value[prefix.len()..])
}

impl Verify for HmacVerifier {
    fn verify<'a>(&self, headers: &HeaderMap, body: &'a [u8], now_unix: i64) -> Result<Verified<'a>, VerifyError> {
        let value = single_header(headers, &self.header)?;
        let encoded = match &self.prefix {
            Some(prefix) => strip_prefix_ci(value, prefix)
                .ok_or(VerifyError::MalformedHeader)?
                .trim_start(),
            None => value,
        };
        let timestamp = match &self.timestamp_header {
            Some(name) => {
                let text = single_header(headers, name)?;
                Some((text, parse_unix(text)?))
            }
            // A `{timestamp}` with no header to read it from cannot be
            // satisfied (`check` reports this configuration).
            None if self.signed.uses_timestamp() => return Err(VerifyError::MissingHeader),
            None => None,
        };
        let t_text = timestamp.map_or("", |(text, _)| text);
        let candidate = [self.encoding.decode(encoded)];
        let expected: Vec<[u8; TAG_LEN]> = self
            .secrets
            .iter()
            .map(|s| self.signed.mac(s.expose(), t_text, body))
            .collect();
        if !any_matches(&expected, &candidate) {
            return Err(VerifyError::Mismatch);
        }
        if let Some((_, t)) = timestamp {
            within_tolerance(t, now_unix, self.tolerance)?;
        }
        Ok(Verified::new(body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    const NOW: i64 = 1_728_138_600; // 2024-10-05T14:30:00Z
    const SECRET: &str = "whsec_test_5f2a9c";
    const OTHER: &str = "whsec_other_0b11";

    const CRUMB_ORDER: &str = include_str!("../tests/fixtures/crumbpos-order-created.json");

    const CRUMB_PAYMENT: &str = include_str!("../tests/fixtures/crumbpos-payment-completed.json");

    const CRAVE_ORDER: &str = include_str!("../tests/fixtures/crave-order-created.json");

    fn secrets(list: &[&str]) -> Vec<Secret> {
        list.iter().map(|s| Secret::new((*s).to_owned())).collect()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn crumb() -> CrumbPosVerifier {
        CrumbPosVerifier::new(secrets(&[SECRET]), DEFAULT_TOLERANCE)
    }

    fn crumb_verify(v: &CrumbPosVerifier, sig: &str, body: &[u8]) -> Result<(), VerifyError> {
        v.verify(&headers(&[("Crumb-Signature", sig)]), body, NOW)
            .map(|ok| assert_eq!(ok.body(), body))
    }

    fn hex_sig(secret: &str, payload: &[u8]) -> String {
        hex::encode(mac_parts(secret.as_bytes(), &[payload]))
    }

    // -- primitives ---------------------------------------------------------

    #[test]
    fn hmac_sha256_matches_rfc4231_case_2() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?"
        assert_eq!(
            hex_sig("Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn reasons_and_messages_are_stable_and_short() {
        let all = [
            (VerifyError::MissingHeader, "missing_header"),
            (VerifyError::MalformedHeader, "malformed_header"),
            (VerifyError::Mismatch, "mismatch"),
            (VerifyError::TimestampOutOfTolerance, "timestamp_out_of_tolerance"),
        ];
        for (err, reason) in all {
            assert_eq!(err.reason(), reason);
            assert!(!err.to_string().is_empty() && err.to_string().len() < 60);
        }
    }

    #[test]
    fn secrets_never_appear_in_debug() {
        let s = Secret::new(SECRET.to_owned());
        assert_eq!(format!("{s:?}"), "Secret(***)");
        let crumb = crumb();
        let crave = CraveVerifier::new(secrets(&[SECRET, OTHER]));
        let hmac = HmacVerifier {
            secrets: secrets(&[SECRET]),
            header: HeaderName::from_static("x-signature"),
            encoding: Encoding::Hex,
            prefix: Some("sha256=".into()),
            timestamp_header: None,
            signed: SignedPayload::default(),
            tolerance: DEFAULT_TOLERANCE,
        };
        for dbg in [
            format!("{crumb:?}"),
            format!("{crave:?}"),
            format!("{hmac:?}"),
            format!("{:#?}", hmac),
        ] {
            assert!(!dbg.contains(SECRET), "{dbg}");
            assert!(!dbg.contains(OTHER), "{dbg}");
            assert!(!dbg.contains("whsec"), "{dbg}");
            assert!(dbg.contains("***"), "{dbg}");
        }
    }

    #[test]
    fn verified_debug_does_not_print_the_body() {
        let sig = sign_crave(SECRET.as_bytes(), CRAVE_ORDER.as_bytes());
        let v = CraveVerifier::new(secrets(&[SECRET]));
        let h = headers(&[("X-Crave-Signature", &sig)]);
        let ok = v.verify(&h, CRAVE_ORDER.as_bytes(), NOW).unwrap();
        let dbg = format!("{ok:?}");
        assert!(!dbg.contains("evt_abc123"));
        assert!(dbg.contains(&CRAVE_ORDER.len().to_string()));
    }

    // -- CrumbPOS -----------------------------------------------------------

    #[test]
    fn crumb_signs_and_verifies_vendor_payloads() {
        for body in [CRUMB_ORDER, CRUMB_PAYMENT] {
            let sig = sign_crumbpos(SECRET.as_bytes(), NOW, body.as_bytes());
            assert!(sig.starts_with(&format!("t={NOW},v1=")));
            // The documented construction: hex HMAC of "<t>.<body>".
            let expected = hex_sig(SECRET, format!("{NOW}.{body}").as_bytes());
            assert_eq!(sig, format!("t={NOW},v1={expected}"));
            assert_eq!(crumb_verify(&crumb(), &sig, body.as_bytes()), Ok(()));
        }
    }

    #[test]
    fn crumb_rejects_a_tampered_body() {
        let sig = sign_crumbpos(SECRET.as_bytes(), NOW, CRUMB_ORDER.as_bytes());
        let mut body = CRUMB_ORDER.as_bytes().to_vec();
        let at = CRUMB_ORDER.find("4250").unwrap();
        body[at] = b'9';
        assert_eq!(crumb_verify(&crumb(), &sig, &body), Err(VerifyError::Mismatch));
        // Re-serialized JSON (same meaning, other bytes) is a mismatch too:
        // verification is on the raw bytes.
        let reserialized =
            serde_json::to_vec(&serde_json::from_str::<serde_json::Value>(CRUMB_ORDER).unwrap()).unwrap();
        assert_eq!(crumb_verify(&crumb(), &sig, &reserialized), Err(VerifyError::Mismatch));
        // An empty body is just another body.
        assert_eq!(crumb_verify(&crumb(), &sig, b""), Err(VerifyError::Mismatch));
    }

    #[test]
    fn crumb_rejects_a_tampered_signature() {
        let sig = sign_crumbpos(SECRET.as_bytes(), NOW, CRUMB_ORDER.as_bytes());
        let last = sig.chars().last().unwrap();
        let flipped = if last == '0' { '1' } else { '0' };
        let bad = format!("{}{flipped}", &sig[..sig.len() - 1]);
        assert_eq!(
            crumb_verify(&crumb(), &bad, CRUMB_ORDER.as_bytes()),
            Err(VerifyError::Mismatch)
        );
        // Truncated signature: cannot match.
        let short = &sig[..sig.len() - 2];
        assert_eq!(
            crumb_verify(&crumb(), short, CRUMB_ORDER.as_bytes()),
            Err(VerifyError::Mismatch)
        );
    }

    #[test]
    fn crumb_rejects_a_tampered_timestamp() {
        let sig = sign_crumbpos(SECRET.as_bytes(), NOW, CRUMB_ORDER.as_bytes());
        let bad = sig.replacen(&format!("t={NOW}"), &format!("t={}", NOW + 1), 1);
        assert_eq!(
            crumb_verify(&crumb(), &bad, CRUMB_ORDER.as_bytes()),
            Err(VerifyError::Mismatch)
        );
        // Leading zeros change the signed text, so they do not verify.
        let zeros = sig.replacen("t=", "t=0", 1);
        assert_eq!(
            crumb_verify(&crumb(), &zeros, CRUMB_ORDER.as_bytes()),
            Err(VerifyError::Mismatch)
        );
    }

    #[test]
    fn crumb_rejects_the_wrong_secret_and_accepts_rotation() {
        let body = CRUMB_ORDER.as_bytes();
        let sig_other = sign_crumbpos(OTHER.as_bytes(), NOW, body);
        assert_eq!(crumb_verify(&crumb(), &sig_other, body), Err(VerifyError::Mismatch));
        let rotated = CrumbPosVerifier::new(secrets(&[SECRET, OTHER]), DEFAULT_TOLERANCE);
        assert_eq!(crumb_verify(&rotated, &sig_other, body), Ok(()));
        let sig = sign_crumbpos(SECRET.as_bytes(), NOW, body);
        assert_eq!(crumb_verify(&rotated, &sig, body), Ok(()));
        // No secrets configured: nothing verifies.
        let none = CrumbPosVerifier::new(vec![], DEFAULT_TOLERANCE);
        assert_eq!(crumb_verify(&none, &sig, body), Err(VerifyError::Mismatch));
    }

    #[test]
    fn crumb_accepts_several_v1_when_one_matches() {
        let body = CRUMB_ORDER.as_bytes();
        let good = hex_sig(SECRET, format!("{NOW}.{CRUMB_ORDER}").as_bytes());
        let wrong = hex_sig(OTHER, format!("{NOW}.{CRUMB_ORDER}").as_bytes());
        for sig in [
            format!("t={NOW},v1={wrong},v1={good}"),
            format!("t={NOW},v1={good},v1={wrong}"),
            format!("v1={wrong}, v1=nothex ,t={NOW},v1={good}"),
            format!("t={NOW},v1={}", good.to_uppercase()),
        ] {
            assert_eq!(crumb_verify(&crumb(), &sig, body), Ok(()), "{sig}");
        }
        let all_wrong = format!("t={NOW},v1={wrong},v1=zz,v1=");
        assert_eq!(crumb_verify(&crumb(), &all_wrong, body), Err(VerifyError::Mismatch));
    }

    #[test]
    fn crumb_parses_headers_robustly() {
        let body = CRUMB_ORDER.as_bytes();
        let good = hex_sig(SECRET, format!("{NOW}.{CRUMB_ORDER}").as_bytes());
        for sig in [
            format!("t={NOW},v1={good}"),
            format!("  t = {NOW} , v1 = {good}  "),
            format!("v1={good},t={NOW}"),
            format!("t={NOW},v0=deadbeef,v1={good},x=y"),
            format!("t={NOW},,v1={good},"),
        ] {
            assert_eq!(crumb_verify(&crumb(), &sig, body), Ok(()), "{sig}");
        }
    }

    #[test]
    fn crumb_missing_and_garbled_headers() {
        let v = crumb();
        let body = CRUMB_ORDER.as_bytes();
        assert_eq!(
            v.verify(&HeaderMap::new(), body, NOW).unwrap_err(),
            VerifyError::MissingHeader
        );
        // Another vendor's header is not ours.
        let crave = headers(&[("X-Crave-Signature", "abcd")]);
        assert_eq!(v.verify(&crave, body, NOW).unwrap_err(), VerifyError::MissingHeader);
        let good = hex_sig(SECRET, format!("{NOW}.{CRUMB_ORDER}").as_bytes());
        for sig in [
            "".to_owned(),
            "   ".to_owned(),
            "garbage".to_owned(),
            format!("v1={good}"),                        // no t
            format!("t={NOW}"),                          // no v1
            format!("t={NOW},v0={good}"),                // only v0
            format!("t=abc,v1={good}"),                  // non-numeric t
            format!("t=-{NOW},v1={good}"),               // signed t
            format!("t=,v1={good}"),                     // empty t
            format!("t=1.5,v1={good}"),                  // fractional t
            format!("t=99999999999999999999,v1={good}"), // overflow
            format!("t={NOW},t={NOW},v1={good}"),        // two t
            format!("t={NOW},v1{good}"),                 // part without '='
        ] {
            assert_eq!(
                crumb_verify(&v, &sig, body),
                Err(VerifyError::MalformedHeader),
                "{sig:?}"
            );
        }
        // The header twice is ambiguous.
        let sig = sign_crumbpos(SECRET.as_bytes(), NOW, body);
        let twice = headers(&[("Crumb-Signature", &sig), ("Crumb-Signature", &sig)]);
        assert_eq!(v.verify(&twice, body, NOW).unwrap_err(), VerifyError::MalformedHeader);
        // Not visible ASCII.
        let mut bin = HeaderMap::new();
        bin.insert(CRUMB_SIGNATURE, HeaderValue::from_bytes(b"t=1,v1=\xff").unwrap());
        assert_eq!(v.verify(&bin, body, NOW).unwrap_err(), VerifyError::MalformedHeader);
    }

    #[test]
    fn crumb_timestamp_window_is_inclusive_and_symmetric() {
        let body = CRUMB_ORDER.as_bytes();
        let v = crumb();
        let tol = DEFAULT_TOLERANCE.as_secs() as i64;
        for (t, expected) in [
            (NOW - tol, Ok(())),
            (NOW + tol, Ok(())),
            (NOW - tol + 1, Ok(())),
            (NOW - tol - 1, Err(VerifyError::TimestampOutOfTolerance)), // stale
            (NOW + tol + 1, Err(VerifyError::TimestampOutOfTolerance)), // future
            (0, Err(VerifyError::TimestampOutOfTolerance)),
            (i64::MAX, Err(VerifyError::TimestampOutOfTolerance)),
        ] {
            let sig = sign_crumbpos(SECRET.as_bytes(), t, body);
            assert_eq!(crumb_verify(&v, &sig, body), expected, "t={t}");
        }
        // A custom tolerance.
        let strict = CrumbPosVerifier::new(secrets(&[SECRET]), Duration::from_secs(10));
        let sig = sign_crumbpos(SECRET.as_bytes(), NOW - 11, body);
        assert_eq!(
            crumb_verify(&strict, &sig, body),
            Err(VerifyError::TimestampOutOfTolerance)
        );
        let sig = sign_crumbpos(SECRET.as_bytes(), NOW - 10, body);
        assert_eq!(crumb_verify(&strict, &sig, body), Ok(()));
    }

    #[test]
    fn crumb_checks_the_mac_before_the_window() {
        // A forged request with a stale timestamp is a mismatch, not a
        // timestamp problem: timestamp_out_of_tolerance is reserved for
        // authentic (replayed or clock-skewed) requests.
        let body = CRUMB_ORDER.as_bytes();
        let stale = NOW - 3600;
        let forged = sign_crumbpos(OTHER.as_bytes(), stale, body);
        assert_eq!(crumb_verify(&crumb(), &forged, body), Err(VerifyError::Mismatch));
        let replayed = sign_crumbpos(SECRET.as_bytes(), stale, body);
        assert_eq!(
            crumb_verify(&crumb(), &replayed, body),
            Err(VerifyError::TimestampOutOfTolerance)
        );
    }

    // -- Crave --------------------------------------------------------------

    fn crave_verify(v: &CraveVerifier, sig: &str, body: &[u8]) -> Result<(), VerifyError> {
        v.verify(&headers(&[("X-Crave-Signature", sig)]), body, NOW)
            .map(|ok| assert_eq!(ok.body(), body))
    }

    #[test]
    fn crave_signs_and_verifies_the_vendor_payload() {
        let v = CraveVerifier::new(secrets(&[SECRET]));
        let body = CRAVE_ORDER.as_bytes();
        let sig = sign_crave(SECRET.as_bytes(), body);
        assert_eq!(sig, hex_sig(SECRET, body));
        assert_eq!(crave_verify(&v, &sig, body), Ok(()));
        assert_eq!(crave_verify(&v, &sig.to_uppercase(), body), Ok(()));
        assert_eq!(crave_verify(&v, &format!("  {sig} "), body), Ok(()));
        // No timestamp: time does not matter.
        let h = headers(&[("X-Crave-Signature", &sig)]);
        assert!(v.verify(&h, body, 0).is_ok());
    }

    #[test]
    fn crave_rejects_tampering_and_wrong_secret() {
        let v = CraveVerifier::new(secrets(&[SECRET]));
        let body = CRAVE_ORDER.as_bytes();
        let sig = sign_crave(SECRET.as_bytes(), body);
        let tampered = CRAVE_ORDER.replace("27.98", "27.99");
        assert_eq!(crave_verify(&v, &sig, tampered.as_bytes()), Err(VerifyError::Mismatch));
        let mut bad_sig = sig.clone().into_bytes();
        bad_sig[10] = if bad_sig[10] == b'a' { b'b' } else { b'a' };
        assert_eq!(
            crave_verify(&v, std::str::from_utf8(&bad_sig).unwrap(), body),
            Err(VerifyError::Mismatch)
        );
        let other = sign_crave(OTHER.as_bytes(), body);
        assert_eq!(crave_verify(&v, &other, body), Err(VerifyError::Mismatch));
        let rotated = CraveVerifier::new(secrets(&[SECRET, OTHER]));
        assert_eq!(crave_verify(&rotated, &other, body), Ok(()));
        assert_eq!(crave_verify(&rotated, &sig, body), Ok(()));
    }

    #[test]
    fn crave_prefix_and_garbage_are_mismatches() {
        let v = CraveVerifier::new(secrets(&[SECRET]));
        let body = CRAVE_ORDER.as_bytes();
        let sig = sign_crave(SECRET.as_bytes(), body);
        for bad in [
            format!("sha256={sig}"),
            "nothex".to_owned(),
            sig[..62].to_owned(),
            format!("{sig}00"),
            format!("t=1,v1={sig}"),
        ] {
            assert_eq!(crave_verify(&v, &bad, body), Err(VerifyError::Mismatch));
        }
        assert_eq!(
            v.verify(&HeaderMap::new(), body, NOW).unwrap_err(),
            VerifyError::MissingHeader
        );
        assert_eq!(crave_verify(&v, " ", body), Err(VerifyError::MalformedHeader));
        let twice = headers(&[("X-Crave-Signature", &sig), ("X-Crave-Signature", &sig)]);
        assert_eq!(v.verify(&twice, body, NOW).unwrap_err(), VerifyError::MalformedHeader);
    }

    // -- hmac kind ----------------------------------------------------------

    fn hmac_kind(encoding: Encoding, prefix: Option<&str>, timestamp: bool, signed: &str) -> HmacVerifier {
        HmacVerifier {
            secrets: secrets(&[SECRET]),
            header: HeaderName::from_static("x-signature"),
            encoding,
            prefix: prefix.map(str::to_owned),
            timestamp_header: timestamp.then(|| HeaderName::from_static("x-timestamp")),
            signed: SignedPayload::parse(signed).unwrap(),
            tolerance: DEFAULT_TOLERANCE,
        }
    }

    fn to_map(list: &[(HeaderName, String)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in list {
            map.append(name.clone(), HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn signed_payload_parses_templates() {
        assert_eq!(SignedPayload::parse("{body}").unwrap(), SignedPayload::default());
        assert_eq!(
            SignedPayload::parse("{timestamp}.{body}").unwrap(),
            SignedPayload::timestamp_dot_body()
        );
        for t in ["{body}", "{timestamp}.{body}", "v0:{timestamp}:{body}", "a}{body}b"] {
            let p = SignedPayload::parse(t).unwrap();
            assert_eq!(p.to_string(), t);
        }
        assert!(!SignedPayload::default().uses_timestamp());
        assert!(SignedPayload::parse("v0:{timestamp}:{body}").unwrap().uses_timestamp());
        let err = |t: &str| SignedPayload::parse(t).unwrap_err();
        assert!(err("").contains("must contain {body}"));
        assert!(err("{timestamp}").contains("must contain {body}"));
        assert!(err("{body}{body}").contains("only once"));
        assert!(err("{ts}.{body}").contains("unknown placeholder"));
        assert!(err("{body").contains("unknown placeholder"));
        assert!(err("{BODY}").contains("unknown placeholder"));
    }

    #[test]
    fn signed_payload_matches_a_manual_concatenation() {
        let p = SignedPayload::parse("v0:{timestamp}:{body}").unwrap();
        let tag = p.mac(SECRET.as_bytes(), "123", b"{\"a\":1}");
        assert_eq!(hex::encode(tag), hex_sig(SECRET, b"v0:123:{\"a\":1}"));
    }

    #[test]
    fn hmac_hex_body_only() {
        let v = hmac_kind(Encoding::Hex, None, false, "{body}");
        assert_eq!(v.check(), Ok(()));
        let body = CRAVE_ORDER.as_bytes();
        let hs = v.sign(SECRET.as_bytes(), None, body);
        assert_eq!(hs.len(), 1);
        assert_eq!(hs[0].1, hex_sig(SECRET, body));
        assert!(v.verify(&to_map(&hs), body, NOW).is_ok());
        assert_eq!(v.verify(&to_map(&hs), b"{}", NOW).unwrap_err(), VerifyError::Mismatch);
        let other = v.sign(OTHER.as_bytes(), None, body);
        assert_eq!(v.verify(&to_map(&other), body, NOW).unwrap_err(), VerifyError::Mismatch);
        assert_eq!(
            v.verify(&HeaderMap::new(), body, NOW).unwrap_err(),
            VerifyError::MissingHeader
        );
    }

    #[test]
    fn hmac_base64_padded_and_unpadded() {
        let v = hmac_kind(Encoding::Base64, None, false, "{body}");
        let body = CRUMB_PAYMENT.as_bytes();
        let hs = v.sign(SECRET.as_bytes(), None, body);
        let value = hs[0].1.clone();
        assert!(value.ends_with('='), "32 bytes encode with one pad: {value}");
        assert_eq!(
            base64::engine::general_purpose::STANDARD.decode(&value).unwrap(),
            mac_parts(SECRET.as_bytes(), &[body])
        );
        assert!(v.verify(&to_map(&hs), body, NOW).is_ok());
        let unpadded = headers(&[("x-signature", value.trim_end_matches('='))]);
        assert!(v.verify(&unpadded, body, NOW).is_ok());
        // Hex where base64 is expected, URL-safe alphabet, garbage: mismatch.
        let hexed = headers(&[("x-signature", &hex_sig(SECRET, body))]);
        assert_eq!(v.verify(&hexed, body, NOW).unwrap_err(), VerifyError::Mismatch);
        let url = value.replace('+', "-").replace('/', "_");
        if url != value {
            let url = headers(&[("x-signature", &url)]);
            assert_eq!(v.verify(&url, body, NOW).unwrap_err(), VerifyError::Mismatch);
        }
        let junk = headers(&[("x-signature", "!!!")]);
        assert_eq!(v.verify(&junk, body, NOW).unwrap_err(), VerifyError::Mismatch);
    }

    #[test]
    fn hmac_prefix_is_required_and_stripped() {
        let v = hmac_kind(Encoding::Hex, Some("sha256="), false, "{body}");
        let body = CRAVE_ORDER.as_bytes();
        let hs = v.sign(SECRET.as_bytes(), None, body);
        let expected = format!("sha256={}", hex_sig(SECRET, body));
        assert_eq!(hs[0].1, expected);
        assert!(v.verify(&to_map(&hs), body, NOW).is_ok());
        let upper = headers(&[("x-signature", &expected.replacen("sha256", "SHA256", 1))]);
        assert!(v.verify(&upper, body, NOW).is_ok());
        let bare = headers(&[("x-signature", &hex_sig(SECRET, body))]);
        assert_eq!(v.verify(&bare, body, NOW).unwrap_err(), VerifyError::MalformedHeader);
        let short = headers(&[("x-signature", "sha")]);
        assert_eq!(v.verify(&short, body, NOW).unwrap_err(), VerifyError::MalformedHeader);
        let empty_sig = headers(&[("x-signature", "sha256=")]);
        assert_eq!(v.verify(&empty_sig, body, NOW).unwrap_err(), VerifyError::Mismatch);
    }

    #[test]
    fn hmac_with_timestamp() {
        let v = hmac_kind(Encoding::Hex, Some("v0="), true, "v0:{timestamp}:{body}");
        assert_eq!(v.check(), Ok(()));
        let body = CRAVE_ORDER.as_bytes();
        let hs = v.sign(SECRET.as_bytes(), Some(NOW), body);
        assert_eq!(hs.len(), 2);
        assert_eq!(hs[1], (HeaderName::from_static("x-timestamp"), NOW.to_string()));
        assert_eq!(
            hs[0].1,
            format!("v0={}", hex_sig(SECRET, format!("v0:{NOW}:{CRAVE_ORDER}").as_bytes()))
        );
        assert!(v.verify(&to_map(&hs), body, NOW).is_ok());
        assert!(v.verify(&to_map(&hs), body, NOW + 300).is_ok());
        assert_eq!(
            v.verify(&to_map(&hs), body, NOW + 301).unwrap_err(),
            VerifyError::TimestampOutOfTolerance
        );
        assert_eq!(
            v.verify(&to_map(&hs), body, NOW - 301).unwrap_err(),
            VerifyError::TimestampOutOfTolerance
        );
        // Tampered timestamp header: it is signed, so mismatch.
        let mut tampered = hs.clone();
        tampered[1].1 = (NOW + 1).to_string();
        assert_eq!(
            v.verify(&to_map(&tampered), body, NOW).unwrap_err(),
            VerifyError::Mismatch
        );
        // Missing / garbled timestamp header.
        assert_eq!(
            v.verify(&to_map(&hs[..1]), body, NOW).unwrap_err(),
            VerifyError::MissingHeader
        );
        let mut garbled = hs.clone();
        garbled[1].1 = "soon".to_owned();
        assert_eq!(
            v.verify(&to_map(&garbled), body, NOW).unwrap_err(),
            VerifyError::MalformedHeader
        );
        // Forged and stale: mismatch first.
        let forged = v.sign(OTHER.as_bytes(), Some(NOW - 3600), body);
        assert_eq!(
            v.verify(&to_map(&forged), body, NOW).unwrap_err(),
            VerifyError::Mismatch
        );
        // `None` signs at the current time.
        let now = jiff::Timestamp::now().as_second();
        let fresh = v.sign(SECRET.as_bytes(), None, body);
        assert!(v.verify(&to_map(&fresh), body, now).is_ok());
    }

    #[test]
    fn hmac_timestamp_header_without_signed_timestamp_still_bounds_age() {
        let v = hmac_kind(Encoding::Base64, None, true, "{body}");
        let body = b"{\"id\":\"1\",\"type\":\"x\"}";
        let hs = v.sign(SECRET.as_bytes(), Some(NOW), body);
        assert!(v.verify(&to_map(&hs), body, NOW).is_ok());
        assert_eq!(
            v.verify(&to_map(&hs), body, NOW + 1000).unwrap_err(),
            VerifyError::TimestampOutOfTolerance
        );
    }

    #[test]
    fn hmac_check_rejects_timestamp_without_header() {
        let mut v = hmac_kind(Encoding::Hex, None, false, "{timestamp}.{body}");
        assert!(v.check().unwrap_err().contains("timestamp_header"));
        let hs = v.sign(SECRET.as_bytes(), Some(NOW), b"{}");
        assert_eq!(
            v.verify(&to_map(&hs), b"{}", NOW).unwrap_err(),
            VerifyError::MissingHeader
        );
        v.timestamp_header = Some(HeaderName::from_static("x-timestamp"));
        assert_eq!(v.check(), Ok(()));
    }

    #[test]
    fn encoding_parses() {
        assert_eq!(Encoding::parse("hex"), Ok(Encoding::Hex));
        assert_eq!(Encoding::parse("base64"), Ok(Encoding::Base64));
        assert!(Encoding::parse("base32").unwrap_err().contains("base32"));
    }

    #[test]
    fn verifiers_are_object_safe() {
        let list: Vec<Box<dyn Verify>> = vec![
            Box::new(crumb()),
            Box::new(CraveVerifier::new(secrets(&[SECRET]))),
            Box::new(hmac_kind(Encoding::Hex, None, false, "{body}")),
        ];
        for v in &list {
            assert_eq!(
                v.verify(&HeaderMap::new(), b"{}", NOW).unwrap_err(),
                VerifyError::MissingHeader
            );
        }
    }
}
