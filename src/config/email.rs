//! `type = "email"` sinks: an SMTP server (`smtp = { host, port, tls,
//! username, password, ca_file }`), a fixed sender, and templates for the
//! recipient, subject and bodies.

use std::path::Path;

use expeditor_api::{TemplateId, TemplateSet};
use expeditor_email::{EmailSinkConfig, SmtpConfig, TlsMode};
use toml::Spanned;
use toml::de::DeValue;

use super::raw::{RawEmailSink, RawSmtp, Str};
use super::{Cx, SinkKind, SinkSpec, interpolate_with};

impl Cx<'_> {
    pub(super) fn email_sink(
        &mut self,
        name: &str,
        key: &str,
        value: &Spanned<DeValue<'_>>,
        base: &Path,
    ) -> Option<SinkSpec> {
        let r: RawEmailSink = self.typed(value, key)?;
        let common = sink_common!(self, key, r);
        let smtp = self.smtp(&format!("{key}.smtp"), &r.smtp, base);

        let fkey = format!("{key}.from");
        let from = self
            .resolve(&r.from, &fkey)
            .and_then(|f| match expeditor_email::parse_mailbox(&f) {
                Ok(m) => Some(m),
                Err(msg) => {
                    self.error_at(r.from.span(), &fkey, msg);
                    None
                }
            });

        let mut set = TemplateSet::new();
        let mut text_template = |cx: &mut Self, field: &str, s: &Str| -> Option<TemplateId> {
            let k = format!("{key}.{field}");
            let v = cx.resolve_template(s, &k)?;
            cx.template(&mut set, &k, &v, s.span())
        };
        let to = text_template(self, "to", &r.to);
        // Commas from `${VAR}` values are the config's own, not event data.
        let plain_to = interpolate_with(r.to.get_ref(), self.env, false).unwrap_or_default();
        let to_name = r.to_name.as_ref().map(|s| text_template(self, "to_name", s));
        let subject = text_template(self, "subject", &r.subject);
        let text = text_template(self, "text", &r.text);
        // Named `sinks.NAME.html`: MiniJinja auto-escapes templates whose name
        // ends in `.html`, so values inserted into the HTML body are escaped.
        let html = r.html.as_ref().map(|s| text_template(self, "html", s));
        if r.to.get_ref().trim().is_empty() {
            self.error_at(
                r.to.span(),
                &format!("{key}.to"),
                "is empty; e.g. \"{{ order.customer.email }}\"",
            );
            return None;
        }
        // A fixed recipient is checked now, as `from` is: otherwise every
        // delivery would be a dead letter.
        if is_fixed_text(&plain_to)
            && let Err(msg) = expeditor_email::parse_recipients(&plain_to)
        {
            self.error_at(r.to.span(), &format!("{key}.to"), msg);
            return None;
        }

        let common = common?;
        let to_name = match to_name {
            Some(t) => Some(t?),
            None => None,
        };
        let html = match html {
            Some(t) => Some(t?),
            None => None,
        };
        Some(SinkSpec {
            name: name.to_string(),
            common,
            kind: SinkKind::Email(EmailSinkConfig {
                name: name.to_string(),
                smtp: smtp?,
                from: from?,
                to: to?,
                to_name,
                to_most: expeditor_email::most_recipients(&plain_to),
                subject: subject?,
                text: text?,
                html,
                timeout: common.timeout,
                templates: set.finish(),
            }),
        })
    }

    fn smtp(&mut self, key: &str, raw: &Spanned<RawSmtp>, base: &Path) -> Option<SmtpConfig> {
        let r = raw.get_ref();
        let hkey = format!("{key}.host");
        let host = self.resolve(&r.host, &hkey).and_then(|h| {
            let h = h.trim().to_string();
            // A colon is a port unless the host is an IPv6 address.
            let port_in_host = h.contains(':') && h.parse::<std::net::Ipv6Addr>().is_err();
            if h.is_empty() || h.contains("://") || h.contains('/') || h.contains(char::is_whitespace) || port_in_host {
                self.error_at(
                    r.host.span(),
                    &hkey,
                    "must be a host name or address, e.g. \"smtp.example.com\" (the port goes in port)",
                );
                return None;
            }
            Some(h)
        });
        let tkey = format!("{key}.tls");
        let tls = match &r.tls {
            Some(t) => self.resolve(t, &tkey).and_then(|v| match v.trim().parse::<TlsMode>() {
                Ok(mode) => Some(mode),
                Err(msg) => {
                    self.error_at(t.span(), &tkey, msg);
                    None
                }
            }),
            None => Some(TlsMode::StartTls),
        };
        let port = match (&r.port, tls) {
            (Some(p), _) => self.int(Some(p), &format!("{key}.port"), 0, 1..65536).map(|p| p as u16),
            (None, Some(mode)) => Some(mode.default_port()),
            (None, None) => None,
        };
        let username = r
            .username
            .as_ref()
            .and_then(|u| self.resolve(u, &format!("{key}.username")));
        let password = r
            .password
            .as_ref()
            .and_then(|p| self.resolve(p, &format!("{key}.password")));
        let credentials = match (&r.username, &r.password) {
            (None, None) => Some(None),
            (Some(ru), Some(rp)) => match (username, password) {
                (Some(u), _) if u.is_empty() => {
                    self.error_at(ru.span(), &format!("{key}.username"), "is empty");
                    None
                }
                (_, Some(p)) if p.is_empty() => {
                    self.error_at(rp.span(), &format!("{key}.password"), "is empty");
                    None
                }
                (Some(u), Some(p)) => Some(Some((u, p))),
                _ => None,
            },
            (Some(u), None) => {
                self.error_at(u.span(), &format!("{key}.password"), "is required with username");
                None
            }
            (None, Some(p)) => {
                self.error_at(p.span(), &format!("{key}.username"), "is required with password");
                None
            }
        };
        if tls == Some(TlsMode::None) {
            let span = r.tls.as_ref().map_or(raw.span(), |t| t.span());
            if r.username.is_some() {
                self.error_at(
                    span,
                    &tkey,
                    "is \"none\" but username and password are set: they would cross the network in \
                     clear text; use tls = \"starttls\" or \"tls\"",
                );
                return None;
            }
            if r.ca_file.is_some() {
                self.error_at(span, &tkey, "is \"none\", so ca_file would not be used");
                return None;
            }
        }
        let ckey = format!("{key}.ca_file");
        let ca_pem = match &r.ca_file {
            Some(c) => {
                let path = self.resolve(c, &ckey).map(|p| base.join(p.trim()));
                match path.map(|p| (std::fs::read(&p), p)) {
                    Some((Ok(pem), path)) => match expeditor_email::parse_ca(&pem) {
                        Ok(()) => Some(Some(pem)),
                        Err(msg) => {
                            self.error_at(c.span(), &ckey, format!("{}: {msg}", path.display()));
                            None
                        }
                    },
                    Some((Err(e), path)) => {
                        self.error_at(c.span(), &ckey, format!("cannot read {}: {e}", path.display()));
                        None
                    }
                    None => None,
                }
            }
            None => Some(None),
        };
        Some(SmtpConfig {
            host: host?,
            port: port?,
            tls: tls?,
            credentials: credentials?,
            ca_pem: ca_pem?,
        })
    }
}

/// Whether a `to` holds no template: its text is what every delivery sends to.
fn is_fixed_text(to: &str) -> bool {
    !["{{", "{%", "{#"].iter().any(|open| to.contains(open))
}
