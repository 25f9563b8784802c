//! Renders one delivery into a MIME message.

use std::str::FromStr;

use expeditor_api::{Delivery, DeliveryError, TemplateError};
use lettre::Message;
use lettre::message::{Mailbox, Mailboxes, MultiPart, SinglePart};

use crate::EmailSinkConfig;

/// `<KEY@DOMAIN>`: the delivery key is 32 hex characters, the domain the
/// sender's, so the id is unique to this (event, sink) and stable across
/// every attempt and replay.
pub(crate) fn message_id(key: &str, from: &Mailbox) -> String {
    format!("<{key}@{}>", from.email.domain())
}

/// Everything that can fail here is in the config or the event, not the
/// network, so every error is permanent.
pub(crate) fn render(cfg: &EmailSinkConfig, delivery: &Delivery) -> Result<Message, DeliveryError> {
    let templates = &cfg.templates;
    let ctx = templates.context_for(&delivery.event);
    let render = |t| templates.render(t, &ctx).map_err(render_error);

    let to = render(&cfg.to)?;
    let to = to.trim();
    if to.is_empty() {
        return Err(DeliveryError::permanent(format!(
            "sinks.{}.to: rendered empty: the event names no recipient",
            cfg.name
        )));
    }
    // The address is the customer's: it is not quoted in the stored error.
    let mut recipients = Mailboxes::from_str(to)
        .map_err(|e| DeliveryError::permanent(format!("sinks.{}.to: not a valid email address ({e})", cfg.name)))?;
    let rendered = recipients.iter().count();
    if let Some(most) = cfg.to_most
        && rendered > most
    {
        return Err(DeliveryError::permanent(format!(
            "sinks.{}.to: rendered {rendered} addresses where its template names at most {most}: \
             event data held a list (an email field with a comma?); sent to none",
            cfg.name
        )));
    }
    if let Some(name) = &cfg.to_name {
        let mut list = recipients.into_iter();
        let (Some(only), None) = (list.next(), list.next()) else {
            return Err(DeliveryError::permanent(format!(
                "sinks.{}.to_name: names one recipient, but `to` rendered several",
                cfg.name
            )));
        };
        let name = one_line(&render(name)?);
        recipients = Mailboxes::new().with(Mailbox::new((!name.is_empty()).then_some(name), only.email));
    }

    let subject = one_line(&render(&cfg.subject)?);
    let text = render(&cfg.text)?;
    let mut builder = Message::builder()
        .from(cfg.from.clone())
        .subject(subject)
        .message_id(Some(message_id(&delivery.key, &cfg.from)))
        .user_agent(concat!("expeditor/", env!("CARGO_PKG_VERSION")).to_owned());
    for mailbox in recipients {
        builder = builder.to(mailbox);
    }
    let message = match &cfg.html {
        Some(html) => builder.multipart(MultiPart::alternative_plain_html(text, render(html)?)),
        None => builder.singlepart(SinglePart::plain(text)),
    };
    message.map_err(|e| DeliveryError::permanent(format!("sinks.{}: cannot build the message ({e})", cfg.name)))
}

/// A header value on one line: a template's line breaks become spaces.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The message starts with the template's key path (`sinks.confirm.subject`).
fn render_error(err: TemplateError) -> DeliveryError {
    DeliveryError::permanent(err.message)
}
