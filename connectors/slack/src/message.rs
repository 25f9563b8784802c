//! Renders one delivery into what Slack is sent.

use expeditor_api::{Delivery, DeliveryError, TemplateError};
use serde_json::Value as Json;
use slack_morphism::prelude::SlackBlock;

use crate::{SlackSinkConfig, SlackTarget};

/// A message ready to post.
#[derive(Debug)]
pub(crate) struct Message {
    /// `None` for an incoming webhook, which fixes its channel.
    pub channel: Option<String>,
    pub text: Option<String>,
    pub blocks: Option<Vec<SlackBlock>>,
}

/// Everything that can fail here is in the config or the event, not the
/// network, so every error is permanent.
pub(crate) fn render(cfg: &SlackSinkConfig, delivery: &Delivery) -> Result<Message, DeliveryError> {
    let templates = &cfg.templates;
    let ctx = templates.context_for(&delivery.event);

    let channel = match &cfg.target {
        SlackTarget::Api { channel, .. } => {
            let channel = templates.render(channel, &ctx).map_err(render_error)?;
            let channel = channel.trim();
            if channel.is_empty() {
                return Err(DeliveryError::permanent(format!(
                    "sinks.{}.channel: rendered empty",
                    cfg.name
                )));
            }
            Some(channel.to_owned())
        }
        SlackTarget::Webhook { .. } => None,
    };

    let text = match &cfg.text {
        Some(t) => Some(templates.render(t, &ctx).map_err(render_error)?).filter(|t| !t.trim().is_empty()),
        None => None,
    };

    let blocks = match &cfg.blocks {
        Some(b) => blocks(&cfg.name, templates.render_json(b, &ctx).map_err(render_error)?)?,
        None => None,
    };

    if text.is_none() && blocks.is_none() {
        // Slack would answer `no_text`: say which templates came out empty.
        return Err(DeliveryError::permanent(format!(
            "sinks.{}: text and blocks both rendered empty; nothing to post",
            cfg.name
        )));
    }
    Ok(Message { channel, text, blocks })
}

/// The rendered `blocks`: an array of objects with a `type`, or nothing
/// (`null`, `[]`). Each block is passed on exactly as rendered: wrapping it
/// in slack-morphism's catch-all variant serializes the JSON untouched, where
/// its typed models would drop any field they do not know. Slack validates
/// the blocks itself (`invalid_blocks`, a permanent error).
pub(crate) fn blocks(sink: &str, rendered: Json) -> Result<Option<Vec<SlackBlock>>, DeliveryError> {
    let items = match rendered {
        Json::Null => return Ok(None),
        Json::Array(items) => items,
        other => {
            return Err(DeliveryError::permanent(format!(
                "sinks.{sink}.blocks: must render to an array of Block Kit blocks, not {}",
                kind(&other)
            )));
        }
    };
    if items.is_empty() {
        return Ok(None);
    }
    let mut blocks = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        if !item.get("type").is_some_and(Json::is_string) {
            return Err(DeliveryError::permanent(format!(
                "sinks.{sink}.blocks[{i}]: a block must be an object with a \"type\" (e.g. \"section\"), not {}",
                kind(&item)
            )));
        }
        blocks.push(SlackBlock::Unknown(item));
    }
    Ok(Some(blocks))
}

fn kind(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object without a \"type\"",
    }
}

/// The message starts with the template's key path (`sinks.alerts.text`).
fn render_error(err: TemplateError) -> DeliveryError {
    DeliveryError::permanent(err.message)
}
