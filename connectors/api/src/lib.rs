//! What every sink shares with the delivery engine.
//!
//! - [`event`]: the event as sinks and templates see it (`event`, `payload`,
//!   and the normalized `order`, `payment` and `stock` views).
//! - [`sink`]: the [`Sink`] trait, the [`Delivery`] it is handed and the
//!   [`DeliveryError`] that says whether a failure is worth retrying.
//! - [`retry`]: the one retry policy (exponential backoff, jitter,
//!   `Retry-After`), applied by the engine, never by a sink.
//! - [`template`]: MiniJinja templates and `when` expressions, including the
//!   structured templates whose single-expression leaves keep their JSON type.

pub mod event;
pub mod message;
pub mod retry;
pub mod sink;
pub mod template;

pub use event::{Customer, Event, EventMeta, Item, Modifier, Order, Payment, Stock, Views, currency_exponent};
pub use retry::RetryPolicy;
pub use sink::{Delivery, DeliveryError, Outcome, Sink, delivery_key, one_by_one};
pub use template::{Escape, Reads, Structured, TemplateError, TemplateId, TemplateSet, Templates, member_names};
