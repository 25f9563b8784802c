//! `type = "slack"` sinks: a bot token and a channel (`chat.postMessage`), or
//! an incoming webhook URL; `text` and/or Block Kit `blocks` templates.

use expeditor_api::{Escape, TemplateSet};
use expeditor_slack::{DEFAULT_API_URL, SlackSinkConfig, SlackTarget};
use toml::Spanned;
use toml::de::DeValue;

use super::raw::RawSlackSink;
use super::{Cx, SinkKind, SinkSpec};

impl Cx<'_> {
    pub(super) fn slack_sink(&mut self, name: &str, key: &str, value: &Spanned<DeValue<'_>>) -> Option<SinkSpec> {
        let r: RawSlackSink = self.typed(value, key)?;
        let common = sink_common!(self, key, r);
        let mut set = TemplateSet::new();
        let mut ok = true;

        let target = match (&r.token, &r.webhook_url) {
            (Some(_), Some(url)) => {
                self.error_at(
                    url.span(),
                    &format!("{key}.webhook_url"),
                    "set either token and channel (Web API) or webhook_url (incoming webhook), not both",
                );
                None
            }
            (None, None) => {
                self.error_at(
                    value.span(),
                    &format!("{key}.token"),
                    "is required: a bot token (token = \"${SLACK_BOT_TOKEN}\" with a channel), \
                     or webhook_url = \"${SLACK_WEBHOOK_URL}\" for an incoming webhook",
                );
                None
            }
            (Some(token), None) => {
                let tkey = format!("{key}.token");
                let token = self
                    .resolve(token, &tkey)
                    .and_then(|t| match expeditor_slack::check_token(&t) {
                        Ok(()) => Some(t),
                        Err(msg) => {
                            self.error_at(token.span(), &tkey, msg);
                            None
                        }
                    });
                let ckey = format!("{key}.channel");
                let channel = match &r.channel {
                    Some(c) => self.resolve_template(c, &ckey).and_then(|v| {
                        if v.trim().is_empty() {
                            self.error_at(c.span(), &ckey, "is empty; e.g. \"#inventory-alerts\" or a channel id");
                            return None;
                        }
                        self.template(&mut set, &ckey, &v, c.span())
                    }),
                    None => {
                        self.error_at(
                            value.span(),
                            &ckey,
                            "is required with token: a channel name (\"#inventory-alerts\") or id (\"C0123ABCD\")",
                        );
                        None
                    }
                };
                let ukey = format!("{key}.api_url");
                let api_url = match &r.api_url {
                    Some(u) => self
                        .resolve(u, &ukey)
                        .and_then(|v| match expeditor_slack::check_url(v.trim()) {
                            Ok(url) => Some(url),
                            Err(msg) => {
                                self.error_at(u.span(), &ukey, msg);
                                None
                            }
                        }),
                    None => expeditor_slack::check_url(DEFAULT_API_URL).ok(),
                };
                match (token, channel, api_url) {
                    (Some(token), Some(channel), Some(api_url)) => Some(SlackTarget::Api {
                        token,
                        channel,
                        api_url,
                    }),
                    _ => None,
                }
            }
            (None, Some(url)) => {
                for (k, v) in [("channel", &r.channel), ("api_url", &r.api_url)] {
                    if let Some(v) = v {
                        let why = if k == "channel" {
                            "an incoming webhook posts to the channel it was created for; remove channel, or use token"
                        } else {
                            "is for the Web API (token); an incoming webhook is posted to its own URL"
                        };
                        self.error_at(v.span(), &format!("{key}.{k}"), why);
                        ok = false;
                    }
                }
                let ukey = format!("{key}.webhook_url");
                self.resolve(url, &ukey)
                    .and_then(|v| match expeditor_slack::check_url(v.trim()) {
                        Ok(url) => Some(SlackTarget::Webhook { url }),
                        Err(msg) => {
                            self.error_at(url.span(), &ukey, msg);
                            None
                        }
                    })
            }
        };

        // Slack parses `&`, `<` and `>` in the message's `text` and in
        // `mrkdwn` text objects: there a value's are escaped. Not in
        // `plain_text` or rich text elements, which show them as they are.
        let text_key = format!("{key}.text");
        let mut mrkdwn: std::collections::HashSet<String> = std::collections::HashSet::new();
        if let (Some(_), DeValue::Table(table)) = (&r.blocks, value.get_ref())
            && let Some(b) = table.get("blocks")
        {
            // Read once more below, where its errors are reported.
            let reported = self.errors.len();
            if let Some(json) = self.json_value_as(&format!("{key}.blocks"), b, true) {
                mrkdwn.extend(expeditor_api::member_names(
                    &format!("{key}.blocks"),
                    &json,
                    &|object, member| {
                        member == "text" && object.get("type").and_then(serde_json::Value::as_str) == Some("mrkdwn")
                    },
                ));
            }
            self.errors.truncate(reported);
        }
        set.escape_values(Escape::Slack, move |name| name == text_key || mrkdwn.contains(name));
        let text = match &r.text {
            Some(t) => {
                let tkey = format!("{key}.text");
                let v = self.resolve_template(t, &tkey);
                let t = v.and_then(|v| self.template(&mut set, &tkey, &v, t.span()));
                ok &= t.is_some();
                t
            }
            None => None,
        };
        let blocks = match (r.blocks.is_some(), value.get_ref()) {
            (true, DeValue::Table(table)) => {
                let b = table.get("blocks").expect("blocks was deserialized");
                let bkey = format!("{key}.blocks");
                match b.get_ref() {
                    DeValue::Array(_) | DeValue::String(_) => {
                        let s = self.structured(&mut set, &bkey, b);
                        ok &= s.is_some();
                        s
                    }
                    _ => {
                        self.error_at(
                            b.span(),
                            &bkey,
                            "must be an array of Block Kit blocks ([[sinks.NAME.blocks]] tables), \
                             or a template that renders one",
                        );
                        ok = false;
                        None
                    }
                }
            }
            _ => None,
        };
        if r.text.is_none() && r.blocks.is_none() {
            self.error_at(
                value.span(),
                &format!("{key}.text"),
                "is required (or blocks): the message, e.g. \"Low stock: {{ stock.name }}\"",
            );
            ok = false;
        }

        let common = common?;
        let target = target?;
        if !ok {
            return None;
        }
        Some(SinkSpec {
            name: name.to_string(),
            common,
            kind: SinkKind::Slack(SlackSinkConfig {
                name: name.to_string(),
                target,
                text,
                blocks,
                timeout: common.timeout,
                templates: set.finish(),
            }),
        })
    }
}
