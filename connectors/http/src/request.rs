//! Renders one delivery into a request.

use std::cell::OnceCell;

use bytes::Bytes;
use expeditor_api::{Delivery, DeliveryError, TemplateError};
use http::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, USER_AGENT};
use http::{Request, Uri};

use crate::HttpSinkConfig;

const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
const ATTEMPT: HeaderName = HeaderName::from_static("x-expeditor-attempt");
const AGENT: &str = concat!("expeditor/", env!("CARGO_PKG_VERSION"));
/// Room for a templated body at first: a KDS ticket of a few items fits.
const BODY_CAPACITY: usize = 512;

/// Everything that can fail here is in the config or the event, not the
/// network, so every error is permanent.
pub(crate) fn build(
    cfg: &HttpSinkConfig,
    url: Option<&Uri>,
    delivery: &Delivery,
) -> Result<Request<Bytes>, DeliveryError> {
    let templates = &cfg.templates;
    // Built at most once, and only if a template needs it: turning the event
    // into the template context costs about as much as the request itself.
    let ctx = OnceCell::new();
    let ctx = || ctx.get_or_init(|| templates.context_for(&delivery.event));

    let url = match url {
        Some(url) => url.clone(),
        None => parse_url(cfg, &templates.render(&cfg.url, ctx()).map_err(render_error)?)?,
    };

    let body = match &cfg.body {
        // Written as it renders, with no JSON value built in between.
        Some(body) => {
            let mut text = Vec::with_capacity(BODY_CAPACITY);
            templates.write_json(body, ctx(), &mut text).map_err(render_error)?;
            text
        }
        None => serde_json::to_vec(&*delivery.event)
            .map_err(|e| DeliveryError::permanent(format!("body cannot be written as JSON: {e}")))?,
    };

    let mut headers = HeaderMap::with_capacity(cfg.headers.len() + 4);
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(USER_AGENT, HeaderValue::from_static(AGENT));
    for (name, template) in &cfg.headers {
        let value = match template.literal() {
            Some(text) => text.to_owned(),
            None => templates.render(template, ctx()).map_err(render_error)?,
        };
        let mut value = HeaderValue::try_from(value).map_err(|_| {
            DeliveryError::permanent(format!(
                "sinks.{}.headers.{name}: rendered value is not a valid header value",
                cfg.name
            ))
        })?;
        // Kept out of HPACK tables and `Debug` output.
        value.set_sensitive(true);
        headers.insert(name.clone(), value);
    }
    // Last, so no configured header can replace them.
    let key = HeaderValue::try_from(delivery.key.as_str())
        .map_err(|_| DeliveryError::permanent("delivery key is not a valid header value"))?;
    headers.insert(IDEMPOTENCY_KEY, key);
    headers.insert(ATTEMPT, HeaderValue::from(delivery.attempt));

    // Built directly: the builder would merge `headers` into an empty map
    // one by one. The URL and headers are checked above.
    let mut request = Request::new(Bytes::from(body));
    *request.method_mut() = cfg.method.clone();
    *request.uri_mut() = url;
    *request.headers_mut() = headers;
    Ok(request)
}

/// A rendered (or literal) `url`, checked. The URL may carry a secret (a
/// token in the query): errors never quote it. Parsed as a WHATWG URL first,
/// as a browser or reqwest would (so `HTTP://Host/a b` is sent as
/// `http://host/a%20b`), then as the URI hyper sends.
pub(crate) fn parse_url(cfg: &HttpSinkConfig, url: &str) -> Result<Uri, DeliveryError> {
    let invalid =
        |e: &dyn std::fmt::Display| DeliveryError::permanent(format!("sinks.{}.url: not a valid URL ({e})", cfg.name));
    let url = url::Url::parse(url).map_err(|e| invalid(&e))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(DeliveryError::permanent(format!(
            "sinks.{}.url: scheme must be http or https",
            cfg.name
        )));
    }
    Uri::try_from(url.as_str()).map_err(|e| invalid(&e))
}

/// The message starts with the template's key path (`sinks.kds.body.total`).
fn render_error(err: TemplateError) -> DeliveryError {
    DeliveryError::permanent(err.message)
}
