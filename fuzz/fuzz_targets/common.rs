//! The config both targets run against: every source kind (`hmac` twice: base64
//! with a prefix and a signed timestamp, and hex over the body alone with two
//! secrets) and a sink of each
//! kind whose templates read what a webhook brings (the views, the payload,
//! loops, filters), as in `config.toml`'s commented examples.

use std::path::Path;
use std::sync::LazyLock;

use expeditor::config::{self, Config};

const CONFIG: &str = r##"
[store]
path = "/nonexistent/expeditor-fuzz"

[sources.crumb]
kind = "crumbpos"
secrets = ["crumb-secret"]

[sources.crave]
kind = "crave"
secrets = ["crave-secret"]

[sources.hook]
kind = "hmac"
secrets = ["hook-secret"]
header = "X-Signature"
encoding = "base64"
prefix = "sha256="
timestamp_header = "X-Timestamp"
signed = "v0:{timestamp}:{body}"
id_field = "meta.id"
type_field = "meta.kind"
time_field = "meta.at"

[sources.plain]
kind = "hmac"
secrets = ["plain-secret", "plain-secret-next"]
header = "X-Hub-Signature"

[sinks.events]
type = "file"
path = "/nonexistent/events.jsonl"

[sinks.kds]
type = "http"
url = "http://127.0.0.1:9/tickets/{{ order.location_id }}"
headers = { "X-Order" = "{{ order.id }}" }

[sinks.kds.body]
external_id = "{{ order.id }}"
location_id = "{{ order.location_id }}"
channel = "{{ order.channel }}"
priority = "{{ 'high' if order.channel == 'delivery' else 'normal' }}"
items = "{{ order.items }}"
placed_at = "{{ event.occurred_at }}"
payment = { amount = "{{ payment.amount_cents }}", brand = "{{ payment.card_brand | upper if payment.card_brand else none }}" }
stock = ["{{ stock.item_id }}", "{{ stock.quantity - stock.reorder_point if stock.quantity is number and stock.reorder_point is number else none }}"]
raw = "{{ payload }}"

[sinks.loyalty]
type = "http"
url = "http://127.0.0.1:9/points"

[sinks.loyalty.body]
customer_id = "{{ order.customer.id }}"
points = "{{ order.total_cents // 100 }}"
reason = "order {{ order.id }} at {{ order.location_id }}"

[sinks.warehouse]
type = "bigquery"
project = "p"
dataset = "d"
table = "t"
auth = "none"
endpoint = "http://127.0.0.1:9"

[sinks.warehouse.row]
event_id = "{{ event.id }}"
order_id = "{{ order.id }}"
is_delivery = "{{ order.channel == 'delivery' }}"
total_cents = "{{ order.total_cents }}"
currency = "{{ order.currency | upper if order.currency else none }}"
items = "{{ order.items }}"

[sinks.alerts]
type = "slack"
token = "xoxb-fuzz"
channel = "#{{ stock.location_id or 'inventory' }}"
text = "Low stock: {{ stock.name }} at {{ payload.data.attributes.location_name or stock.location_id }}"

[[sinks.alerts.blocks]]
type = "section"
text = { type = "mrkdwn", text = "*{{ stock.name }}*: {{ stock.quantity }} of {{ stock.reorder_point }}" }

[sinks.mail]
type = "email"
smtp = { host = "127.0.0.1", port = 9, tls = "none" }
from = "Orders <orders@example.com>"
to = "{{ order.customer.email }}"
to_name = "{{ order.customer.name }}"
subject = "Order confirmed: {{ order.id }}"
text = """
Hi {{ order.customer.name or 'there' }},
{% for item in order.items %}
  {{ item.quantity }} x {{ item.name }}{% for m in item.modifiers %} + {{ m.name }}{% endfor %}
{%- endfor %}
Total: {{ order.total_cents | money(order.currency) }} {{ order.currency | upper }}
"""

[[routes]]
name = "everything"
events = ["*"]
sinks = ["events", "warehouse"]

[[routes]]
name = "kitchen"
events = ["order.*", "payment.*", "inventory.*"]
when = "order.total_cents > 0 or payment.amount_cents or stock.quantity"
sinks = ["kds"]

[[routes]]
name = "loyalty"
when = "order.customer.id and order.total_cents"
sinks = ["loyalty"]

[[routes]]
name = "stock"
events = ["inventory.*"]
when = "payload.data.attributes.quantity is defined"
sinks = ["alerts"]

[[routes]]
name = "mail"
sources = ["crave", "crumb"]
when = "order.customer.email"
sinks = ["mail"]
"##;

/// The sources, picked by an input's first byte (modulo their number).
pub const SOURCES: [&str; 4] = ["crumb", "crave", "hook", "plain"];

pub static FUZZ_CONFIG: LazyLock<Config> = LazyLock::new(|| {
    config::parse(Path::new("fuzz.toml"), CONFIG, &|_| None)
        .unwrap_or_else(|e| panic!("the fuzz config does not load:\n{e}"))
});
