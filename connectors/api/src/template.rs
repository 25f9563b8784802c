//! MiniJinja templates and expressions: one language for `when` rules and for
//! every templated sink field.
//!
//! A [`TemplateSet`] compiles everything of one component (a sink's body, the
//! router's `when`s) when the config is loaded, so syntax errors surface in
//! `expeditor check`, not at the first delivery. The finished [`Templates`] is
//! immutable and shared by all workers.

use std::sync::Arc;

use minijinja::value::{Enumerator, Object, Serde, Value};
use minijinja::{AutoEscape, Environment, UndefinedBehavior};
use serde_json::Value as Json;

use crate::Event;

/// A template or expression that failed to compile or to render.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct TemplateError {
    pub message: String,
}

impl From<minijinja::Error> for TemplateError {
    fn from(err: minijinja::Error) -> Self {
        // `Display` of a minijinja error names the kind and the detail; the
        // template name is ours (a config key path), so it is kept.
        let mut message = match err.kind() {
            minijinja::ErrorKind::OutOfFuel => format!(
                "the template did more than one render may ({RENDER_FUEL} steps, or about 64 MiB made; a loop over large event data?)"
            ),
            kind => kind.to_string(),
        };
        if let Some(detail) = err.detail() {
            message = format!("{message}: {detail}");
        }
        if let Some(line) = err.line() {
            message = format!("{message} (line {line} of the template)");
        }
        Self { message }
    }
}

/// Handle to one compiled template or expression in a [`Templates`].
/// `Debug` names it and hides its text: a literal may be a resolved secret
/// (`Authorization = "Bearer ${KDS_TOKEN}"`).
#[derive(Clone, PartialEq, Eq)]
pub struct TemplateId {
    name: String,
    /// Expressions keep the type of their value; text templates are strings.
    typed: bool,
    /// A text template without template syntax renders as itself: known
    /// now, so rendering it needs no context.
    literal: Option<String>,
    /// An expression that is only a field of the event or of a view
    /// (`order.items`): a structured leaf reads it straight from the event
    /// (see [`Templates::render_json`]). Boxed: most templates have none,
    /// and configs hold many ids.
    field: Option<Box<FieldPath>>,
}

impl std::fmt::Debug for TemplateId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TemplateId")
            .field("name", &self.name)
            .field("typed", &self.typed)
            .field("literal", &self.literal.as_ref().map(|_| "<hidden>"))
            .field("field", &self.field)
            .finish()
    }
}

/// `root.field` or `root.field.key...`, where root is `event`, `order`,
/// `payment` or `stock`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FieldPath {
    root: &'static str,
    field: String,
    /// Keys within the field's value (`customer.id`: `["id"]`).
    within: Vec<String>,
}

impl FieldPath {
    /// `"order.items"`, `"order.customer.id"` -> a path; anything else (a
    /// filter, an index, an operator, the payload) is `None` and is
    /// evaluated.
    fn parse(expr: &str) -> Option<FieldPath> {
        let mut segments = expr.trim().split('.');
        let first = segments.next()?;
        let root = ["event", "order", "payment", "stock"]
            .into_iter()
            .find(|r| *r == first)?;
        let identifier = |s: &str| {
            let mut chars = s.chars();
            chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        };
        let mut keys = segments.map(|s| identifier(s).then(|| s.to_owned()));
        let field = keys.next()??;
        let within = keys.collect::<Option<Vec<_>>>()?;
        Some(FieldPath { root, field, within })
    }
}

impl TemplateId {
    /// The text this template always renders, if it has no template syntax.
    pub fn literal(&self) -> Option<&str> {
        self.literal.as_deref()
    }
}

/// Whether `s` holds template syntax (an expression, a statement or a comment).
fn has_syntax(s: &str) -> bool {
    s.contains("{{") || s.contains("{%") || s.contains("{#")
}

/// A structured template: a JSON tree whose string leaves are templates.
#[derive(Debug, Clone)]
pub enum Structured {
    Literal(Json),
    Template(TemplateId),
    Array(Vec<Structured>),
    Object(Vec<(String, Structured)>),
}

/// Collects templates while a config is loaded.
pub struct TemplateSet {
    env: Environment<'static>,
    /// Which templates escape the values they write, and how (besides
    /// HTML for an `.html` template): see [`TemplateSet::escape_values`].
    escapes: Vec<EscapeRule>,
}

/// An [`Escape`] and the template names it applies to.
type EscapeRule = (Escape, Arc<dyn Fn(&str) -> bool + Send + Sync>);

/// How a template escapes the values it writes, so event data lands as data
/// and not as syntax of what the template makes. Text written in the
/// template itself is never escaped, nor a value marked `| safe`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Escape {
    /// Percent-encoded, all but letters, digits and `-._~`: a value can
    /// change neither a URL's host, port, path nor query (`a/b?c` is sent
    /// as `a%2Fb%3Fc`), and a value of `.` or `..`, which would climb the
    /// path, fails the render.
    Url,
    /// `&`, `<` and `>` as `&amp;`, `&lt;` and `&gt;`: Slack's control
    /// characters, with which a customer's name could mention `<!channel>`
    /// or show a link of its own.
    Slack,
}

impl Escape {
    fn mode(self) -> AutoEscape {
        match self {
            Escape::Url => AutoEscape::Custom(URL_ESCAPE.into()),
            Escape::Slack => AutoEscape::Custom(SLACK_ESCAPE.into()),
        }
    }
}

const URL_ESCAPE: &str = "expeditor-url";
const SLACK_ESCAPE: &str = "expeditor-slack";

/// Fuel for one render (MiniJinja counts an instruction as about one, and
/// 64 bytes of data made as one): a ticket for an order of thousands of
/// items takes a few hundred thousand, while a loop that event data drives
/// without end (`range(item.quantity)` over every item) is stopped in tens
/// of milliseconds, with at most about 64 MiB made.
const RENDER_FUEL: u64 = 1_000_000;

/// Writes a value as [`Escape::Url`] says.
fn write_url_value(out: &mut minijinja::Output, value: &Value) -> Result<(), minijinja::Error> {
    /// What is left as is: RFC 3986's unreserved characters.
    const KEEP: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    let text = value_text(value);
    if text == "." || text == ".." {
        return Err(minijinja::Error::new(
            minijinja::ErrorKind::InvalidOperation,
            format!("a value of {text:?} in a URL would climb its path"),
        ));
    }
    write!(out, "{}", percent_encoding::utf8_percent_encode(&text, KEEP)).map_err(minijinja::Error::from)
}

/// Writes a value as [`Escape::Slack`] says.
fn write_slack_value(out: &mut minijinja::Output, value: &Value) -> Result<(), minijinja::Error> {
    let text = value_text(value);
    let mut rest = text.as_ref();
    while let Some(at) = rest.find(['&', '<', '>']) {
        out.write_str(&rest[..at])?;
        out.write_str(match rest.as_bytes()[at] {
            b'&' => "&amp;",
            b'<' => "&lt;",
            _ => "&gt;",
        })?;
        rest = &rest[at + 1..];
    }
    out.write_str(rest).map_err(minijinja::Error::from)
}

/// A value as the template would write it.
fn value_text(value: &Value) -> std::borrow::Cow<'_, str> {
    match value.as_str() {
        Some(s) => s.into(),
        None if value.is_undefined() => "".into(),
        None => value.to_string().into(),
    }
}

impl Default for TemplateSet {
    fn default() -> Self {
        Self::new()
    }
}

/// The name of a structured value's member: `sinks.kds.body.note`, or
/// `sinks.kds.body["html"]` for a key that would make it read as an HTML
/// template's name and have its values escaped.
fn leaf_name(parent: &str, key: &str) -> String {
    let name = format!("{parent}.{key}");
    if name.ends_with(".html") {
        format!("{parent}[{key:?}]")
    } else {
        name
    }
}

/// The names a template's context has (`Templates::context`), besides the
/// environment's globals (`range`, `dict`, `namespace`, ...).
const CONTEXT_NAMES: [&str; 5] = ["event", "payload", "order", "payment", "stock"];

/// Every name a template's tags assign: the targets of `set` and `with`
/// (before `=`), of `for` (before `in`), and a macro's name and parameters.
/// Over-collecting only lets a misspelling through; missing one would
/// refuse a good template.
fn assigned_names(source: &str) -> std::collections::HashSet<&str> {
    let mut names = std::collections::HashSet::new();
    for tag in tags(source) {
        // `set x`, `set(a, b)`: the keyword is the leading identifier.
        let keyword = identifiers(tag).next().filter(|k| tag.starts_with(k)).unwrap_or("");
        let body = &tag[keyword.len()..];
        match keyword {
            "set" => names.extend(identifiers(body.split('=').next().unwrap_or(""))),
            // `with a = 1, b = 2`: each name before an `=`.
            "with" => names.extend(
                body.split(',')
                    .filter_map(|p| p.split('=').next())
                    .flat_map(identifiers),
            ),
            "for" => names.extend(identifiers(body.split(" in ").next().unwrap_or(""))),
            "macro" => names.extend(identifiers(body)),
            _ => {}
        }
    }
    names
}

/// The inside of each `{% ... %}` tag, without its whitespace control.
fn tags(source: &str) -> impl Iterator<Item = &str> {
    let mut rest = source;
    std::iter::from_fn(move || {
        let start = rest.find("{%")?;
        let after = &rest[start + 2..];
        let end = after.find("%}")?;
        rest = &after[end + 2..];
        Some(after[..end].trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace()))
    })
}

fn identifiers(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with(|c: char| c.is_alphabetic() || c == '_'))
}

/// Name of the variable that captures an expression's value (see [`TemplateSet::expression`]).
const RESULT_VAR: &str = "__expeditor_value";

fn escape_of(escapes: &[EscapeRule], name: &str) -> Option<Escape> {
    escapes.iter().find(|(_, applies)| applies(name)).map(|(e, _)| *e)
}

/// The names [`TemplateSet::structured`] gives the string members of
/// `value` (compiled as `name`) that `pick` chooses: it sees each object
/// and one of its keys. So a rule can name the leaves of one kind of object
/// (Slack's `mrkdwn` text objects) before they are compiled.
pub fn member_names(
    name: &str,
    value: &Json,
    pick: &dyn Fn(&serde_json::Map<String, Json>, &str) -> bool,
) -> Vec<String> {
    let mut out = Vec::new();
    match value {
        Json::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                out.extend(member_names(&format!("{name}[{i}]"), v, pick));
            }
        }
        Json::Object(map) => {
            for (k, v) in map {
                let member = leaf_name(name, k);
                if v.is_string() && pick(map, k) {
                    out.push(member.clone());
                }
                out.extend(member_names(&member, v, pick));
            }
        }
        _ => {}
    }
    out
}

impl TemplateSet {
    pub fn new() -> Self {
        let mut env = Environment::new();
        // Optional vendor fields are common (`order.customer.id` on a walk-in
        // order): a missing one renders empty and is false in a `when`, rather
        // than failing the delivery.
        env.set_undefined_behavior(UndefinedBehavior::Chainable);
        // Event data decides how often a loop runs: each render may do only
        // so much, so one event cannot hold a worker (and every delivery
        // behind it) for minutes.
        env.set_fuel(Some(RENDER_FUEL));
        // A field the vendor sent as null (or the event's views left out, as
        // `order.customer.email` of a guest) renders empty like a missing
        // one, not as the word "none" (an email to "none", a Slack "at none").
        env.set_formatter(|out, state, value| {
            if value.is_none() {
                return Ok(());
            }
            match state.auto_escape() {
                AutoEscape::Custom(_) if value.is_safe() => {
                    out.write_str(&value_text(value)).map_err(minijinja::Error::from)
                }
                AutoEscape::Custom(mode) if mode == URL_ESCAPE => write_url_value(out, value),
                AutoEscape::Custom(_) => write_slack_value(out, value),
                _ => minijinja::escape_formatter(out, state, value),
            }
        });
        env.add_filter("money", money_filter);
        env.add_filter("units", units_filter);
        // Its result is encoded already: marked safe, so a `url` template
        // (whose values are percent-encoded) does not encode it twice.
        env.add_filter("urlencode", |value: &Value| {
            minijinja::filters::urlencode(value).map(Value::from_safe_string)
        });
        let mut set = Self {
            env,
            escapes: Vec::new(),
        };
        set.install_escapes();
        set
    }

    /// Escapes the values written by the templates whose names `applies`
    /// to (config key paths: `sinks.kds.url`), added from now on. A leaf of
    /// a structured value that is one `{{ expression }}` is then a text
    /// template: escaping makes a string.
    pub fn escape_values(&mut self, escape: Escape, applies: impl Fn(&str) -> bool + Send + Sync + 'static) {
        self.escapes.push((escape, Arc::new(applies)));
        self.install_escapes();
    }

    fn escape_of(&self, name: &str) -> Option<Escape> {
        escape_of(&self.escapes, name)
    }

    /// Escaping is chosen by a template's name, the config key: an HTML
    /// body (`sinks.NAME.html`, the email sink's) is HTML-escaped, and what
    /// [`Self::escape_values`] named as it says. MiniJinja's default would
    /// also quote values in any template whose name ends in `.json`, `.js`
    /// or `.yaml`, and structured leaves below never end in `.html` (see
    /// `leaf_name`).
    fn install_escapes(&mut self) {
        let escapes = self.escapes.clone();
        self.env.set_auto_escape_callback(move |name| {
            if name.ends_with(".html") {
                AutoEscape::Html
            } else {
                escape_of(&escapes, name).map_or(AutoEscape::None, Escape::mode)
            }
        });
    }

    /// Refuses a template (just added as `name`) that reads a name the
    /// context never has: `{{ ordr.id }}` would render empty (missing values
    /// are, on purpose) on every delivery, with nothing to say why; or a
    /// filter or test MiniJinja does not have ([`Self::unknown_filter`]).
    fn refuse_unknown(&mut self, name: &str) -> Result<(), TemplateError> {
        let unknown: Vec<String> = {
            let template = self.env.get_template(name)?;
            // MiniJinja's analysis scopes an `if` branch's `set` to the
            // branch, where rendering does not: a name the template assigns
            // anywhere is taken as known.
            let assigned = assigned_names(template.source());
            let mut unknown: Vec<String> = template
                .undeclared_variables(false)
                .into_iter()
                .filter(|v| {
                    !CONTEXT_NAMES.contains(&v.as_str())
                        && !assigned.contains(v.as_str())
                        && !self.env.globals().any(|(g, _)| g == v)
                })
                .collect();
            unknown.sort();
            unknown
        };
        let refused = if unknown.is_empty() {
            self.unknown_filter(name)
        } else {
            let list = unknown.iter().map(|v| format!("`{v}`")).collect::<Vec<_>>().join(", ");
            Some(format!(
                "unknown name {list}: a template reads `event`, `payload`, `order`, `payment` and `stock`"
            ))
        };
        let Some(message) = refused else { return Ok(()) };
        self.env.remove_template(name);
        Err(TemplateError { message })
    }

    /// A filter or test MiniJinja does not have (`| moneyy`), found by a
    /// render with nothing in the context: MiniJinja looks them up only as
    /// it applies them, so every delivery would fail. One behind a branch
    /// that an empty context does not take is not found here. A template
    /// that runs out of fuel with no data at all would on every delivery
    /// too; the fuel also bounds this render (a loop over a constant range).
    fn unknown_filter(&self, name: &str) -> Option<String> {
        let template = self.env.get_template(name).ok()?;
        let rendered =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| template.render(minijinja::context! {})));
        let err = match rendered {
            Ok(result) => result.err()?,
            Err(_) => return Some("the template panics when rendered".to_owned()),
        };
        matches!(
            err.kind(),
            minijinja::ErrorKind::UnknownFilter | minijinja::ErrorKind::UnknownTest | minijinja::ErrorKind::OutOfFuel
        )
        .then(|| TemplateError::from(err).message)
    }

    /// A text template, rendered to a string. `name` should be the config key
    /// path (`sinks.kds.url`): it shows up in error messages.
    pub fn text(&mut self, name: &str, source: &str) -> Result<TemplateId, TemplateError> {
        self.env.add_template_owned(name.to_owned(), source.to_owned())?;
        self.refuse_unknown(name)?;
        Ok(TemplateId {
            name: name.to_owned(),
            typed: false,
            literal: (!has_syntax(source)).then(|| source.to_owned()),
            field: None,
        })
    }

    /// An expression (`order.total_cents > 0`) whose value keeps its type.
    pub fn expression(&mut self, name: &str, source: &str) -> Result<TemplateId, TemplateError> {
        // Compile first on its own so a syntax error points at the expression
        // the user wrote, not at our wrapper.
        self.env.compile_expression(source)?;
        // Stored as a template that assigns the value: templates can be owned
        // by the environment, bare expressions cannot.
        let wrapped = format!("{{% set {RESULT_VAR} = ({source}) %}}");
        self.env.add_template_owned(name.to_owned(), wrapped)?;
        self.refuse_unknown(name)?;
        Ok(TemplateId {
            name: name.to_owned(),
            typed: true,
            literal: None,
            field: FieldPath::parse(source).map(Box::new),
        })
    }

    /// Compiles a structured value: each string leaf is a template, and a leaf
    /// that is exactly one `{{ expression }}` keeps its JSON type. Every leaf
    /// that does not compile is an error, each named by its path, so `check`
    /// can point at all of them at once.
    pub fn structured(&mut self, name: &str, value: &Json) -> Result<Structured, Vec<TemplateError>> {
        let mut errors = Vec::new();
        let compiled = self.structured_leaves(name, value, &mut errors);
        if errors.is_empty() { Ok(compiled) } else { Err(errors) }
    }

    fn structured_leaves(&mut self, name: &str, value: &Json, errors: &mut Vec<TemplateError>) -> Structured {
        match value {
            Json::String(s) => {
                let compiled = if let Some(expr) = single_expression(s).filter(|_| self.escape_of(name).is_none()) {
                    self.expression(name, expr).map(Structured::Template)
                } else if has_syntax(s) {
                    self.text(name, s).map(Structured::Template)
                } else {
                    Ok(Structured::Literal(value.clone()))
                };
                compiled.unwrap_or_else(|e| {
                    errors.push(at(name, e));
                    Structured::Literal(Json::Null)
                })
            }
            Json::Array(items) => Structured::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| self.structured_leaves(&format!("{name}[{i}]"), v, errors))
                    .collect(),
            ),
            Json::Object(map) => Structured::Object(
                map.iter()
                    .map(|(k, v)| (k.clone(), self.structured_leaves(&leaf_name(name, k), v, errors)))
                    .collect(),
            ),
            other => Structured::Literal(other.clone()),
        }
    }

    pub fn finish(self) -> Arc<Templates> {
        let mut names = std::collections::HashSet::new();
        for (_, template) in self.env.templates() {
            names.extend(template.undeclared_variables(false));
        }
        let (mut payload, mut views) = (false, false);
        for name in &names {
            match name.as_str() {
                "event" => {}
                "payload" => payload = true,
                "order" | "payment" | "stock" => views = true,
                // A global such as `range`, or anything else: all, to be safe.
                _ => (payload, views) = (true, true),
            }
        }
        let reads = Reads::from_parts(payload, views);
        Arc::new(Templates { env: self.env, reads })
    }
}

fn at(name: &str, err: TemplateError) -> TemplateError {
    if err.message.starts_with(name) {
        err
    } else {
        TemplateError {
            message: format!("{name}: {}", err.message),
        }
    }
}

/// `"{{ order.items }}"` -> `Some("order.items")`; anything with text around
/// the expression, or a second expression, is a text template.
fn single_expression(s: &str) -> Option<&str> {
    let inner = s.trim().strip_prefix("{{")?.strip_suffix("}}")?;
    let inner = inner.strip_prefix('-').unwrap_or(inner);
    let inner = inner.strip_suffix('-').unwrap_or(inner);
    if inner.contains("{{") || inner.contains("}}") || inner.contains("{%") || inner.contains("%}") {
        return None;
    }
    let inner = inner.trim();
    (!inner.is_empty()).then_some(inner)
}

/// One view of an event as templates see it, converted a field at a time
/// as they read it: a `when` on `order.total_cents` converts one number,
/// not the order with its items. The same values, field for field and in
/// the same order, as the view converted whole (`Serde`).
struct ViewFields {
    event: Arc<Event>,
    view: View,
}

/// The view's name only: the event holds a customer's details.
impl std::fmt::Debug for ViewFields {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ViewFields")
            .field("view", &self.view)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy)]
enum View {
    Order,
    Payment,
    Stock,
}

impl ViewFields {
    /// The view's template value: `none` when the event has no such view.
    fn value(event: &Arc<Event>, view: View) -> Value {
        let views = &event.views;
        let present = match view {
            View::Order => views.order.is_some(),
            View::Payment => views.payment.is_some(),
            View::Stock => views.stock.is_some(),
        };
        match present {
            true => Value::from_object(ViewFields {
                event: event.clone(),
                view,
            }),
            false => Value::from(()),
        }
    }
}

/// What is done with a view's field once it is found: made a template
/// value, or JSON.
trait FieldVisitor {
    type Out;
    fn visit<T: serde::Serialize>(self, field: &T) -> Option<Self::Out>;
}

/// A field as a template value.
struct ToValue;

impl FieldVisitor for ToValue {
    type Out = Value;
    fn visit<T: serde::Serialize>(self, field: &T) -> Option<Value> {
        Some(Value::from(Serde(field)))
    }
}

/// A field as JSON, with no template value in between.
struct ToJson;

/// A field written as JSON text onto the end of a buffer, with no JSON
/// value in between either. On a failure nothing is left written.
struct ToWriter<'o>(&'o mut Vec<u8>);

impl FieldVisitor for ToWriter<'_> {
    type Out = ();
    fn visit<T: serde::Serialize>(self, field: &T) -> Option<()> {
        write(self.0, field, "field").ok()
    }
}

impl FieldVisitor for ToJson {
    type Out = Json;
    fn visit<T: serde::Serialize>(self, field: &T) -> Option<Json> {
        serde_json::to_value(field).ok()
    }
}

impl ViewFields {
    /// The field `key` of the view, handed to `v`; `None` if the view has no
    /// such field.
    fn field<V: FieldVisitor>(&self, key: &str, v: V) -> Option<V::Out> {
        let views = &self.event.views;
        // Destructured whole, so that a field added to a view cannot be
        // missed here (nor in the names below, which a test compares).
        match self.view {
            View::Order => {
                let crate::Order {
                    id,
                    location_id,
                    status,
                    channel,
                    total_cents,
                    tax_cents,
                    tip_cents,
                    currency,
                    customer,
                    items,
                } = views.order.as_ref()?;
                match key {
                    "id" => v.visit(id),
                    "location_id" => v.visit(location_id),
                    "status" => v.visit(status),
                    "channel" => v.visit(channel),
                    "total_cents" => v.visit(total_cents),
                    "tax_cents" => v.visit(tax_cents),
                    "tip_cents" => v.visit(tip_cents),
                    "currency" => v.visit(currency),
                    "customer" => v.visit(customer),
                    "items" => v.visit(items),
                    _ => None,
                }
            }
            View::Payment => {
                let crate::Payment {
                    id,
                    order_id,
                    amount_cents,
                    tip_cents,
                    method,
                    card_brand,
                    card_last_four,
                    status,
                } = views.payment.as_ref()?;
                match key {
                    "id" => v.visit(id),
                    "order_id" => v.visit(order_id),
                    "amount_cents" => v.visit(amount_cents),
                    "tip_cents" => v.visit(tip_cents),
                    "method" => v.visit(method),
                    "card_brand" => v.visit(card_brand),
                    "card_last_four" => v.visit(card_last_four),
                    "status" => v.visit(status),
                    _ => None,
                }
            }
            View::Stock => {
                let crate::Stock {
                    item_id,
                    name,
                    location_id,
                    quantity,
                    reorder_point,
                } = views.stock.as_ref()?;
                match key {
                    "item_id" => v.visit(item_id),
                    "name" => v.visit(name),
                    "location_id" => v.visit(location_id),
                    "quantity" => v.visit(quantity),
                    "reorder_point" => v.visit(reorder_point),
                    _ => None,
                }
            }
        }
    }
}

impl Object for ViewFields {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        self.field(key.as_str()?, ToValue)
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Str(match self.view {
            View::Order => &[
                "id",
                "location_id",
                "status",
                "channel",
                "total_cents",
                "tax_cents",
                "tip_cents",
                "currency",
                "customer",
                "items",
            ],
            View::Payment => &[
                "id",
                "order_id",
                "amount_cents",
                "tip_cents",
                "method",
                "card_brand",
                "card_last_four",
                "status",
            ],
            View::Stock => &["item_id", "name", "location_id", "quantity", "reorder_point"],
        })
    }
}

/// A leaf that is only a field (`{{ order.items }}`, `{{ event.id }}`,
/// `{{ order.customer.id }}`),
/// read from the context as the expression would read it, without running
/// it: a view's field goes straight from the event to JSON, with no
/// template value in between (for a ticket's items, most of a body's
/// cost). `None` whenever the expression itself should decide (the root or
/// the field is missing, or is not JSON): it is then evaluated as usual,
/// so the result, or the error, is always the expression's.
fn read_field(ctx: &Value, path: &FieldPath) -> Option<Json> {
    field_of(&ctx.get_attr(path.root).ok()?, path)
}

/// [`read_field`] of the path's root, already looked up.
fn field_of(root: &Value, path: &FieldPath) -> Option<Json> {
    let mut json = match root.downcast_object_ref::<ViewFields>() {
        Some(view) => view.field(&path.field, ToJson)?,
        None => {
            let value = root.get_attr(&path.field).ok()?;
            if value.is_undefined() {
                return None;
            }
            serde_json::to_value(&value).ok()?
        }
    };
    for key in &path.within {
        json = match json {
            Json::Object(mut map) => map.remove(key)?,
            _ => return None,
        };
    }
    Some(json)
}

/// [`read_field`] written onto the end of `out` as JSON text; `false` (and
/// nothing written) where that is `None`.
fn write_field(ctx: &Value, path: &FieldPath, out: &mut Vec<u8>) -> bool {
    let Ok(root) = ctx.get_attr(path.root) else {
        return false;
    };
    if path.within.is_empty()
        && let Some(view) = root.downcast_object_ref::<ViewFields>()
    {
        return view.field(&path.field, ToWriter(out)).is_some();
    }
    match field_of(&root, path) {
        Some(json) => write(out, &json, &path.field).is_ok(),
        None => false,
    }
}

/// `value` as compact JSON text onto the end of `out` (the bytes
/// `serde_json::to_vec` gives); on a failure nothing is left written.
fn write<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, value: &T, name: &str) -> Result<(), TemplateError> {
    let start = out.len();
    serde_json::to_writer(&mut *out, value).map_err(|e| {
        out.truncate(start);
        TemplateError {
            message: format!("{name}: value cannot be written as JSON: {e}"),
        }
    })
}

/// `{{ order.total_cents | money }}` -> `"27.98"`: minor units as a decimal
/// string, for people (Slack, email). Integer arithmetic, never floats.
/// With the currency, `{{ order.total_cents | money(order.currency) }}`, it
/// has that currency's decimals (JPY 1200 is `"1200"`, KWD 1234 `"1.234"`);
/// without, or for an unknown one, two. A missing amount renders empty, as
/// a missing field does (a Crave order may come without a total).
fn money_filter(minor: Option<i64>, currency: Option<&str>) -> String {
    let Some(minor) = minor else {
        return String::new();
    };
    let sign = if minor < 0 { "-" } else { "" };
    let abs = minor.unsigned_abs();
    let digits = crate::event::currency_exponent(currency);
    if digits == 0 {
        return format!("{sign}{abs}");
    }
    let unit = 10u64.pow(digits);
    format!("{sign}{}.{:0width$}", abs / unit, abs % unit, width = digits as usize)
}

/// Whole currency units of an amount in minor units, toward zero, with the
/// currency's own decimals (`{{ order.total_cents | units(order.currency) }}`:
/// 2798 USD is 27, 1200 JPY is 1200, 27985 KWD is 27); a missing amount is
/// missing. An integer, so a `body` leaf keeps it a number.
fn units_filter(minor: Option<i64>, currency: Option<&str>) -> Option<i64> {
    let digits = crate::event::currency_exponent(currency);
    minor.map(|m| m / 10i64.pow(digits))
}

/// The compiled templates of one component.
pub struct Templates {
    env: Environment<'static>,
    reads: Reads,
}

/// What a component reads of an event. For templates it is found when they
/// are compiled: converting the payload and views into template values is
/// most of a render's cost, a body like `{ id = "{{ event.id }}" }` needs
/// neither, and one like a KDS ticket (`{{ order.id }}`, `{{ order.items }}`)
/// needs the views but not the vendor's payload, the larger of the two. Any
/// other name (a global such as `range`) reads all. A sink that reads less
/// than all is handed events rebuilt from the store with only that much (see
/// [`crate::Sink::reads`]). Not ordered: payload and views are independent,
/// and what several readers need together is their [`Reads::union`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reads {
    /// `event` (id, source, kind, type, times) only.
    Meta,
    /// `event` and the vendor's `payload`, not the views.
    MetaAndPayload,
    /// `event` and the views (`order`, `payment`, `stock`), not the payload.
    MetaAndViews,
    /// Everything.
    All,
}

impl Reads {
    pub fn from_parts(payload: bool, views: bool) -> Reads {
        match (payload, views) {
            (false, false) => Reads::Meta,
            (true, false) => Reads::MetaAndPayload,
            (false, true) => Reads::MetaAndViews,
            (true, true) => Reads::All,
        }
    }

    /// Whether the vendor's payload is read.
    pub fn payload(self) -> bool {
        matches!(self, Reads::MetaAndPayload | Reads::All)
    }

    /// Whether the normalized views are read.
    pub fn views(self) -> bool {
        matches!(self, Reads::MetaAndViews | Reads::All)
    }

    /// What two readers read together.
    pub fn union(self, other: Reads) -> Reads {
        Reads::from_parts(self.payload() || other.payload(), self.views() || other.views())
    }
}

impl std::fmt::Debug for Templates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Templates").finish_non_exhaustive()
    }
}

impl Templates {
    /// The context templates see: `event`, `payload`, `order`, `payment`, `stock`.
    pub fn context(event: &Event) -> Value {
        Value::from(Serde(event))
    }

    /// What these templates read of an event.
    pub fn reads(&self) -> Reads {
        self.reads
    }

    /// The context with only what these templates read (see [`Reads`]); the
    /// same values as [`Templates::context`] for every name they use.
    pub fn context_for(&self, event: &Arc<Event>) -> Value {
        let meta = || Value::from(Serde(&event.event));
        match self.reads {
            Reads::Meta => minijinja::context! { event => meta() },
            Reads::MetaAndPayload => {
                minijinja::context! { event => meta(), payload => Value::from(Serde(&event.payload)) }
            }
            Reads::MetaAndViews => minijinja::context! {
                event => meta(),
                order => ViewFields::value(event, View::Order),
                payment => ViewFields::value(event, View::Payment),
                stock => ViewFields::value(event, View::Stock),
            },
            Reads::All => Self::context(event),
        }
    }

    /// Renders every template once for `event`, as a delivery would (the
    /// context of [`Templates::context_for`]): the errors, each naming its
    /// template (`expeditor test`).
    pub fn render_all(&self, event: &Arc<Event>) -> Vec<TemplateError> {
        let ctx = self.context_for(event);
        let mut errors: Vec<TemplateError> = self
            .env
            .templates()
            .filter_map(|(name, template)| template.render(ctx.clone()).err().map(|e| at(name, e.into())))
            .collect();
        errors.sort_by(|a, b| a.message.cmp(&b.message));
        errors
    }

    /// Renders a text template, or an expression's value as text.
    pub fn render(&self, id: &TemplateId, ctx: &Value) -> Result<String, TemplateError> {
        if let Some(text) = &id.literal {
            return Ok(text.clone());
        }
        if id.typed {
            let v = self.eval(id, ctx)?;
            return Ok(if v.is_undefined() || v.is_none() {
                String::new()
            } else {
                v.to_string()
            });
        }
        let tmpl = self.env.get_template(&id.name)?;
        tmpl.render(ctx.clone()).map_err(|e| at(&id.name, e.into()))
    }

    /// Evaluates an expression (or renders a text template into a string value).
    pub fn eval(&self, id: &TemplateId, ctx: &Value) -> Result<Value, TemplateError> {
        let tmpl = self.env.get_template(&id.name)?;
        if !id.typed {
            return Ok(Value::from(self.render(id, ctx)?));
        }
        let captured = tmpl.render_captured(ctx.clone()).map_err(|e| at(&id.name, e.into()))?;
        Ok(captured.state().lookup(RESULT_VAR).unwrap_or(Value::UNDEFINED))
    }

    /// Whether a `when` expression holds.
    pub fn is_true(&self, id: &TemplateId, ctx: &Value) -> Result<bool, TemplateError> {
        Ok(self.eval(id, ctx)?.is_true())
    }

    /// Renders a structured template into JSON.
    pub fn render_json(&self, s: &Structured, ctx: &Value) -> Result<Json, TemplateError> {
        Ok(match s {
            Structured::Literal(v) => v.clone(),
            Structured::Template(id) if id.typed => {
                if let Some(json) = id.field.as_ref().and_then(|f| read_field(ctx, f)) {
                    return Ok(json);
                }
                self.eval_json(id, ctx)?
            }
            Structured::Template(id) => Json::String(self.render(id, ctx)?),
            Structured::Array(items) => Json::Array(
                items
                    .iter()
                    .map(|i| self.render_json(i, ctx))
                    .collect::<Result<_, _>>()?,
            ),
            Structured::Object(fields) => Json::Object(
                fields
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), self.render_json(v, ctx)?)))
                    .collect::<Result<_, TemplateError>>()?,
            ),
        })
    }

    /// Renders a structured template as JSON text onto the end of `out`:
    /// the bytes `serde_json::to_vec` gives of [`Templates::render_json`],
    /// or its error, without building the JSON value. For a body that is
    /// sent as it is (an http sink's): the value, every key and string of
    /// it allocated and the keys hashed, then written and dropped, was most
    /// of a KDS ticket's render. After an error `out` may hold part of it.
    pub fn write_json(&self, s: &Structured, ctx: &Value, out: &mut Vec<u8>) -> Result<(), TemplateError> {
        match s {
            Structured::Literal(v) => write(out, v, "literal"),
            Structured::Template(id) if id.typed => {
                if let Some(field) = &id.field
                    && write_field(ctx, field, out)
                {
                    return Ok(());
                }
                write(out, &self.eval_json(id, ctx)?, &id.name)
            }
            Structured::Template(id) => write(out, &self.render(id, ctx)?, &id.name),
            Structured::Array(items) => {
                out.push(b'[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    self.write_json(item, ctx, out)?;
                }
                out.push(b']');
                Ok(())
            }
            Structured::Object(fields) => {
                out.push(b'{');
                for (i, (key, value)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write(out, key, key)?;
                    out.push(b':');
                    self.write_json(value, ctx, out)?;
                }
                out.push(b'}');
                Ok(())
            }
        }
    }

    /// An expression's value as JSON (`null` if it is undefined).
    fn eval_json(&self, id: &TemplateId, ctx: &Value) -> Result<Json, TemplateError> {
        let v = self.eval(id, ctx)?;
        if v.is_undefined() {
            return Ok(Json::Null);
        }
        serde_json::to_value(&v).map_err(|e| TemplateError {
            message: format!("{}: value cannot be written as JSON: {e}", id.name),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EventMeta, Item, Order, Views};
    use serde_json::json;

    fn event() -> Event {
        Event {
            event: EventMeta {
                id: "evt_1".into(),
                source: "crave".into(),
                kind: "crave".into(),
                event_type: "order.created".into(),
                occurred_at: None,
                received_at: "2026-11-23T10:00:00Z".into(),
            },
            payload: json!({"data": {"orderId": "ord_456"}}),
            views: Views {
                order: Some(Order {
                    id: Some("ord_456".into()),
                    channel: Some("delivery".into()),
                    total_cents: Some(2798),
                    items: vec![Item {
                        name: Some("Pizza".into()),
                        quantity: 2,
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                ..Default::default()
            },
        }
    }

    #[test]
    fn a_name_the_context_never_has_is_refused_at_compile() {
        let mut set = TemplateSet::new();
        let err = set.text("sinks.kds.body.id", "#{{ ordr.id }}").unwrap_err();
        assert!(err.message.contains("unknown name `ordr`"), "{err:?}");
        let err = set
            .expression("routes.kitchen.when", "totl > 0 and order.id")
            .unwrap_err();
        assert!(err.message.contains("`totl`"), "{err:?}");
        // Names a template declares, loop variables and globals are known.
        for ok in [
            "{% for item in order.items %}{{ loop.index }}. {{ item.name }}{% endfor %}",
            "{% set id = order.id %}{{ id }} {{ payload.id }} {{ event.type }}",
            "{{ range(3) | list }} {{ dict(a=1).a }} {% set ns = namespace(n=0) %}{{ ns.n }}",
            "{{ payment.amount_cents }} {{ stock.item_id }}",
            // A `set` in an `if` branch is seen after it when rendering.
            "{% if order.channel == 'pos' %}{% set where = 'counter' %}{% else %}{% set where = 'online' %}{% endif %}{{ where }}",
            "{% macro line(i) %}{{ i.name }}{{ sep }}{% endmacro %}{% set sep = ';' %}{% for i in order.items %}{{ line(i) }}{% endfor %}",
            "{% for k, v in payload | items %}{{ k }}={{ v }}{% endfor %}",
            "{% with total = order.total_cents, n = 2 %}{{ total // n }}{% endwith %}",
            "{%- set label -%}x{%- endset %}{{ label }}",
        ] {
            set.text("sinks.ok.text", ok).unwrap_or_else(|e| panic!("{ok}: {e:?}"));
        }
        assert!(set.expression("routes.ok.when", "order.total_cents > 0").is_ok());
        // A filter or test MiniJinja does not have is refused too, wherever
        // the context's values would not matter to reaching it.
        let err = set
            .text("sinks.x.text", "{{ order.total_cents | moneyy }}")
            .unwrap_err();
        assert!(err.message.contains("moneyy"), "{err:?}");
        let err = set.expression("routes.x.when", "order.id is strng").unwrap_err();
        assert!(err.message.contains("strng"), "{err:?}");
        // A template with a loop is run too, within its fuel: one that
        // runs out of it without any data would on every delivery.
        for looping in [
            "{% for i in range(100000) %}{% for j in range(100000) %}{{ j }}{% endfor %}{% endfor %}",
            "{# {% #}{% for i in range(100000) %}{% for j in range(100000) %}{{ j }}{% endfor %}{% endfor %}",
        ] {
            let err = set.text("sinks.x.loop", looping).unwrap_err();
            assert!(err.message.contains("did more than one render may"), "{err:?}");
        }
        let err = set
            .expression("routes.x.when", "([range(100000)] * 100000) | map('sum') | sum < 0")
            .unwrap_err();
        assert!(err.message.contains("did more than one render may"), "{err:?}");
        assert!(
            set.text("sinks.x.loop", "{% for i in range(10) %}{{ i }}{% endfor %}")
                .is_ok()
        );
        let err = set
            .text("sinks.x.loop", "{% for i in range(3) %}{{ i | moneyy }}{% endfor %}")
            .unwrap_err();
        assert!(err.message.contains("moneyy"), "{err:?}");
        assert!(
            set.text(
                "sinks.x.text",
                "{% if order %}{% set(a, b) = (1, 2) %}{% endif %}{{ a }}{{ b }}"
            )
            .is_ok()
        );
        // Assigning from a misspelled name is still caught.
        let err = set.text("sinks.x.text", "{% set id = ordr.id %}{{ id }}").unwrap_err();
        assert!(err.message.contains("`ordr`"), "{err:?}");
        // The refused template is not left behind under its name.
        assert!(set.text("sinks.kds.body.id", "#{{ order.id }}").is_ok());
    }

    #[test]
    fn structured_leaves_keep_types_or_interpolate() {
        let mut set = TemplateSet::new();
        let body = json!({
            "external_id": "{{ order.id }}",
            "total": "{{ order.total_cents }}",
            "points": "{{ order.total_cents // 100 }}",
            "items": "{{ order.items }}",
            "label": "Order {{ order.id }} ({{ order.total_cents | money }})",
            "priority": "{{ 'high' if order.channel == 'delivery' else 'normal' }}",
            "missing": "{{ order.customer.id }}",
            "fixed": 7,
            "list": ["{{ event.type }}", "plain"],
        });
        let s = set.structured("sinks.kds.body", &body).unwrap();
        let t = set.finish();
        let out = t.render_json(&s, &Templates::context(&event())).unwrap();
        assert_eq!(out["external_id"], json!("ord_456"));
        assert_eq!(out["total"], json!(2798));
        assert_eq!(out["points"], json!(27));
        assert_eq!(out["items"][0]["name"], json!("Pizza"));
        assert_eq!(out["items"][0]["quantity"], json!(2));
        assert_eq!(out["label"], json!("Order ord_456 (27.98)"));
        assert_eq!(out["priority"], json!("high"));
        assert_eq!(out["missing"], json!(null));
        assert_eq!(out["fixed"], json!(7));
        assert_eq!(out["list"], json!(["order.created", "plain"]));
    }

    /// A body need not be a table: one template as the whole body keeps its
    /// JSON type too (`body = "{{ payload }}"` sends the vendor's JSON as it
    /// came), and an array's strings are templates.
    #[test]
    fn a_whole_body_may_be_one_template_or_an_array() {
        let mut set = TemplateSet::new();
        let whole = set.structured("sinks.x.body", &json!("{{ payload }}")).unwrap();
        let list = set
            .structured("sinks.y.body", &json!(["{{ order.id }}", "{{ order.total_cents }}"]))
            .unwrap();
        let t = set.finish();
        let event = event();
        let ctx = Templates::context(&event);
        assert_eq!(t.render_json(&whole, &ctx).unwrap(), event.payload);
        assert!(event.payload.is_object());
        assert_eq!(t.render_json(&list, &ctx).unwrap(), json!(["ord_456", 2798]));
    }

    #[test]
    fn expressions_evaluate_and_errors_name_the_key() {
        let mut set = TemplateSet::new();
        let when = set
            .expression("routes[0].when", "order.total_cents > 2000 and event.source == 'crave'")
            .unwrap();
        let t = set.finish();
        assert!(t.is_true(&when, &Templates::context(&event())).unwrap());

        let mut set = TemplateSet::new();
        let err = set.expression("routes[1].when", "order.total_cents >").unwrap_err();
        assert!(err.message.contains("syntax error"), "{}", err.message);
        let errs = set
            .structured("sinks.kds.body", &json!({"x": "{{ order.id "}))
            .unwrap_err();
        assert_eq!(errs.len(), 1);
        assert!(errs[0].message.starts_with("sinks.kds.body.x"), "{}", errs[0].message);
        // Every leaf that does not compile, not only the first.
        let errs = set
            .structured(
                "sinks.kds.body",
                &json!({"x": "{{ order.id ", "ok": "{{ order.id }}", "items": ["{{ 1 + }}", "text {{ }}"]}),
            )
            .unwrap_err();
        let names: Vec<&str> = errs.iter().map(|e| e.message.split(": ").next().unwrap()).collect();
        assert_eq!(
            names,
            ["sinks.kds.body.x", "sinks.kds.body.items[0]", "sinks.kds.body.items[1]"]
        );
    }

    #[test]
    fn null_fields_render_empty_in_text() {
        let mut set = TemplateSet::new();
        let t = set
            .text(
                "sinks.mail.to",
                "[{{ order.customer.email }}][{{ order.tax_cents }}][{{ order.nope }}]",
            )
            .unwrap();
        let t2 = set.text("sinks.mail.subject", "{{ none }}|{{ 0 }}").unwrap();
        let templates = set.finish();
        let ctx = Templates::context(&event());
        assert_eq!(templates.render(&t, &ctx).unwrap(), "[][][]");
        assert_eq!(templates.render(&t2, &ctx).unwrap(), "|0");
    }

    /// `context_for` converts only the parts of the event the templates read,
    /// and renders them exactly as the whole context does.
    #[test]
    fn context_for_holds_what_the_templates_read() {
        let ev = Arc::new(event());
        let cases: [(&str, Reads, &[&str], &[&str]); 6] = [
            (
                "{{ event.id }}/{{ event.type }}",
                Reads::Meta,
                &["event"],
                &["payload", "order"],
            ),
            (
                "{{ event.id }}:{{ payload.data.orderId }}",
                Reads::MetaAndPayload,
                &["event", "payload"],
                &["order"],
            ),
            // A KDS ticket's kind of template: views, not the payload.
            (
                "{{ event.id }}:{{ order.total_cents | money }}:{{ order.items | length }}",
                Reads::MetaAndViews,
                &["event", "order", "payment", "stock"],
                &["payload"],
            ),
            (
                "{{ stock.name if stock else 'none' }}/{{ payment.amount_cents if payment else 0 }}",
                Reads::MetaAndViews,
                &["event", "order", "payment", "stock"],
                &["payload"],
            ),
            (
                "{{ event.id }}:{{ order.total_cents | money }}:{{ payload.data.orderId }}",
                Reads::All,
                &["event", "payload", "order"],
                &[],
            ),
            // A global (or anything else) reads everything, to be safe.
            (
                "{% for i in range(2) %}{{ event.id }}{% endfor %}",
                Reads::All,
                &["event", "payload", "order"],
                &[],
            ),
        ];
        for (source, reads, present, absent) in cases {
            let mut set = TemplateSet::new();
            let id = set.text("sinks.x.body", source).unwrap();
            let t = set.finish();
            assert_eq!(t.reads(), reads, "{source}");
            let ctx = t.context_for(&ev);
            let whole = t.render(&id, &Templates::context(&ev)).unwrap();
            assert_eq!(t.render(&id, &ctx).unwrap(), whole, "{source}");
            for name in present {
                assert!(!ctx.get_attr(name).unwrap().is_undefined(), "{source}: {name} missing");
            }
            for name in absent {
                assert!(ctx.get_attr(name).unwrap().is_undefined(), "{source}: {name} converted");
            }
        }
        // Structured templates and expressions count too.
        let mut set = TemplateSet::new();
        set.structured(
            "sinks.kds.body",
            &json!({"id": "{{ event.id }}", "n": "{{ order.total_cents }}"}),
        )
        .unwrap();
        assert!(!set.finish().context_for(&ev).get_attr("order").unwrap().is_undefined());
    }

    /// The test event with every view, a customer, modifiers and two items.
    fn full_event() -> Event {
        use crate::{Customer, Item, Modifier, Payment, Stock};
        let mut full = event();
        let order = full.views.order.as_mut().unwrap();
        order.customer = Some(Customer {
            id: Some("c_1".into()),
            name: Some("Ada".into()),
            email: None,
        });
        order.items[0].modifiers = vec![Modifier {
            id: Some("m_1".into()),
            name: Some("extra cheese".into()),
            price_cents: Some(150),
        }];
        order.items.push(Item {
            name: Some("Soda".into()),
            quantity: 1,
            unit_price_cents: Some(250),
            total_cents: Some(250),
            modifiers: vec![],
        });
        full.views.payment = Some(Payment {
            id: Some("p_1".into()),
            amount_cents: Some(2798),
            card_last_four: Some("4242".into()),
            ..Default::default()
        });
        full.views.stock = Some(Stock {
            item_id: Some("mi_1".into()),
            quantity: Some(3),
            ..Default::default()
        });
        full.event.occurred_at = Some("2026-11-23T09:59:58Z".into());
        full
    }

    /// A views-only context reads a view a field at a time; every way a
    /// template can look at a view (a field, the whole of it as text or
    /// JSON, its keys, its length, its truth, a missing key or view) gives
    /// what the whole context gives.
    #[test]
    fn views_read_field_by_field_are_the_views_converted_whole() {
        let full = full_event();
        let templates = [
            "{{ order | tojson }}|{{ payment | tojson }}|{{ stock | tojson }}",
            "{{ order }}|{{ payment }}|{{ stock }}",
            "{{ order | length }}/{{ payment | length }}/{{ stock | length }}",
            "{% for k in order %}{{ k }},{% endfor %}",
            "{% for k, v in order | items %}{{ k }}={{ v }};{% endfor %}",
            "{{ order.customer.name }}/{{ order.customer.email }}/{{ order.nope }}/{{ order['total_cents'] }}",
            "{{ order.items | map(attribute='name') | join(',') }}/{{ order.items[0].modifiers[0].price_cents }}",
            "{{ 'o' if order }}{{ 'p' if payment }}{{ 's' if stock }}/{{ order is mapping }}/{{ order.total_cents > 2000 }}",
            "{{ payment.card_last_four }}/{{ stock.quantity * 2 }}/{{ stock.name is none }}",
            "{{ order | dictsort }}/{{ order | list }}/{{ order == order }}/{{ 'items' in order }}",
        ];
        for ev in [full, event()] {
            let ev = Arc::new(ev);
            for source in templates {
                let mut set = TemplateSet::new();
                let id = set.text("sinks.x.body", source).unwrap();
                let t = set.finish();
                assert_eq!(t.reads(), Reads::MetaAndViews, "{source}");
                // The same text, or the same error (no `payment` has no length).
                let whole = t.render(&id, &Templates::context(&ev));
                assert_eq!(t.render(&id, &t.context_for(&ev)), whole, "{source}");
                if ev.views.payment.is_some() {
                    assert!(whole.is_ok(), "{source}: {whole:?}");
                }
            }
            // Expressions keep their type, a view's whole too.
            let mut set = TemplateSet::new();
            let body = json!({
                "order": "{{ order }}",
                "items": "{{ order.items }}",
                "customer": "{{ order.customer }}",
                "payment": "{{ payment }}",
                "stock": "{{ stock }}",
            });
            let s = set.structured("sinks.x.body", &body).unwrap();
            let t = set.finish();
            let whole = t.render_json(&s, &Templates::context(&ev)).unwrap();
            assert_eq!(t.render_json(&s, &t.context_for(&ev)).unwrap(), whole);
            assert_eq!(whole["order"], serde_json::to_value(&ev.views.order).unwrap());
        }
    }

    /// A leaf that is only a field is read without running the expression
    /// (for a view's field, with no template value in between), and gives
    /// what running it gives: every field of every view and of the event,
    /// and the keys of a customer, with the views present and absent, in a
    /// views-only and a whole context; a missing field, key or view is
    /// left to the expression.
    #[test]
    fn a_field_leaf_is_what_its_expression_gives() {
        let full = full_event();
        let mut paths = vec![];
        for (root, value) in [
            ("event", serde_json::to_value(&full.event).unwrap()),
            ("order", serde_json::to_value(&full.views.order).unwrap()),
            ("payment", serde_json::to_value(&full.views.payment).unwrap()),
            ("stock", serde_json::to_value(&full.views.stock).unwrap()),
        ] {
            let fields = value.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
            assert!(fields.len() >= 5, "{root}: {fields:?}");
            paths.extend(
                fields
                    .into_iter()
                    .chain(["nope".to_owned()])
                    .map(|f| format!("{root}.{f}")),
            );
        }
        // Keys within a field: the customer's, and ones that are not there
        // (a list's, a string's) for the expression to decide.
        let customer = serde_json::to_value(&full.views.order.as_ref().unwrap().customer).unwrap();
        let keys = customer
            .as_object()
            .unwrap()
            .keys()
            .chain(&["nope".to_owned()])
            .cloned()
            .collect::<Vec<_>>();
        paths.extend(keys.iter().map(|k| format!("order.customer.{k}")));
        paths.extend(["order.items.name", "order.id.x", "order.customer.id.x"].map(String::from));
        let left_to_the_expression = |p: &str| p.ends_with("nope") || p.ends_with(".x") || p == "order.items.name";
        let mut bare = event();
        bare.views = Default::default();
        for (which, ev) in [("full", full), ("some", event()), ("bare", bare)] {
            let ev = Arc::new(ev);
            for source in &paths {
                let mut set = TemplateSet::new();
                let s = set
                    .structured("sinks.x.body", &json!({ "v": format!("{{{{ {source} }}}}") }))
                    .unwrap();
                let Structured::Object(leaves) = &s else {
                    panic!("{s:?}")
                };
                let Structured::Template(id) = &leaves[0].1 else {
                    panic!("{s:?}")
                };
                assert_eq!(id.field.as_deref(), FieldPath::parse(source).as_ref(), "{source}");
                let t = set.finish();
                for ctx in [t.context_for(&ev), Templates::context(&ev)] {
                    let ran = t.eval(id, &ctx).unwrap();
                    let ran = match ran.is_undefined() {
                        true => Json::Null,
                        false => serde_json::to_value(&ran).unwrap(),
                    };
                    assert_eq!(t.render_json(&s, &ctx).unwrap(), json!({ "v": ran }), "{source}");
                    let mut text = Vec::new();
                    t.write_json(&s, &ctx, &mut text).unwrap();
                    assert_eq!(text, serde_json::to_vec(&json!({ "v": ran })).unwrap(), "{source}");
                    match read_field(&ctx, id.field.as_ref().unwrap()) {
                        Some(direct) => assert_eq!(direct, ran, "{source}"),
                        None => assert!(ran.is_null(), "{source}: {ran}"),
                    }
                    // With every view there, all but the missing are read directly.
                    if which == "full" {
                        let direct = read_field(&ctx, id.field.as_ref().unwrap()).is_some();
                        assert_eq!(direct, !left_to_the_expression(source), "{source}");
                    }
                }
            }
        }
    }

    /// Written as text, a structured template is byte for byte what its
    /// rendered JSON is written as, or fails as that fails: literals of
    /// every JSON type, text that needs escaping, expressions of every
    /// type (a map with a number for a key, a missing value), field leaves,
    /// nesting; with the views present and absent, in either context.
    #[test]
    fn written_json_is_the_rendered_json_as_text() {
        let body = json!({
            "literals": [1, -2.5, 1e300, true, null, "quote \" back \\ nl \n tab \t é ✓ \u{1}", { "nested": [[], {}] }],
            "text": "Order {{ order.id }} \"{{ order.customer.name }}\"\n{{ event.source }} – ✓ \\ {{ '\u{7}' }}",
            "plain": "no template here",
            "typed": {
                "int": "{{ order.total_cents }}",
                "arith": "{{ (order.total_cents or 0) // 100 }}",
                "float": "{{ (order.total_cents or 1) / 3 }}",
                "bool": "{{ order.channel == 'delivery' }}",
                "none": "{{ none }}",
                "missing": "{{ order.nope }}",
                "list": "{{ [1, 'two', none, [3]] }}",
                "map": "{{ {'b': 1, 'a': [2]} }}",
                "number_keys": "{{ {1: 'one', 2: 'two'} }}",
                "money": "{{ (order.total_cents or 0) | money }}",
                "string": "{{ 'a \"b\" \\ c' }}",
            },
            "fields": ["{{ order.items }}", "{{ order.customer }}", "{{ order.customer.name }}", "{{ event.id }}", "{{ payment.card_last_four }}", "{{ stock }}"],
            "": "{{ event.type }}",
            "key \" with \n escapes ✓": [],
        });
        let mut set = TemplateSet::new();
        let s = set.structured("sinks.x.body", &body).unwrap();
        let t = set.finish();
        let mut bare = event();
        bare.views = Default::default();
        for ev in [full_event(), event(), bare] {
            let ev = Arc::new(ev);
            for ctx in [t.context_for(&ev), Templates::context(&ev)] {
                let rendered = t.render_json(&s, &ctx).unwrap();
                let mut text = b"before ".to_vec();
                t.write_json(&s, &ctx, &mut text).unwrap();
                assert_eq!(
                    text,
                    [&b"before "[..], &serde_json::to_vec(&rendered).unwrap()].concat()
                );
                assert_eq!(rendered["typed"]["number_keys"], json!({ "1": "one", "2": "two" }));
            }
        }

        // An expression that fails fails the same way, wherever it is.
        for failing in [
            json!({ "a": 1, "b": "{{ 'x' + 1 }}" }),
            json!(["ok", { "deep": ["{{ order.items | join(1, 2, 3) }}"] }]),
            json!({ "a": "text {{ 'x' + 1 }}" }),
        ] {
            let mut set = TemplateSet::new();
            let s = set.structured("sinks.x.body", &failing).unwrap();
            let t = set.finish();
            let ctx = Templates::context(&event());
            let rendered = t.render_json(&s, &ctx).unwrap_err();
            let written = t.write_json(&s, &ctx, &mut Vec::new()).unwrap_err();
            assert_eq!(written.message, rendered.message, "{failing}");
            assert!(written.message.starts_with("sinks.x.body"), "{}", written.message);
        }
    }

    #[test]
    fn field_paths_are_one_field_of_the_event_or_a_view() {
        let path =
            |s: &str| FieldPath::parse(s).map(|p| [&[p.root.to_owned(), p.field][..], &p.within].concat().join("/"));
        assert_eq!(path("order.items").as_deref(), Some("order/items"));
        assert_eq!(path(" event.occurred_at ").as_deref(), Some("event/occurred_at"));
        assert_eq!(path("stock.reorder_point").as_deref(), Some("stock/reorder_point"));
        assert_eq!(path("order.customer.id").as_deref(), Some("order/customer/id"));
        for not in [
            "order",
            "order.customer.",
            "order..id",
            "order.items | length",
            "order.items[0]",
            "order['id']",
            "payload.id",
            "orders.id",
            "order.",
            "order.1st",
            "order.total_cents > 0",
            "order . id",
        ] {
            assert_eq!(path(not), None, "{not}");
        }
    }

    /// Payload and views are independent: what two readers need together.
    #[test]
    fn reads_union_is_each_part_read_by_either() {
        use Reads::*;
        let all = [Meta, MetaAndPayload, MetaAndViews, All];
        for a in all {
            assert_eq!(Reads::from_parts(a.payload(), a.views()), a);
            for b in all {
                let u = a.union(b);
                assert_eq!(u, b.union(a));
                assert_eq!(u.payload(), a.payload() || b.payload(), "{a:?} with {b:?}");
                assert_eq!(u.views(), a.views() || b.views(), "{a:?} with {b:?}");
            }
        }
        assert_eq!(MetaAndPayload.union(MetaAndViews), All);
        assert_eq!(Meta.union(MetaAndViews), MetaAndViews);
    }

    #[test]
    fn only_an_html_body_is_escaped() {
        let mut set = TemplateSet::new();
        let body = json!({
            "html": "{{ '<b>&' }} x",
            "json": "{{ 'a' }} b",
            "yaml": "{{ 'c' }} d",
            "nested": { "html": ["{{ '<i>' }} y"] },
        });
        let s = set.structured("sinks.kds.body", &body).unwrap();
        let html = set.text("sinks.mail.html", "<p>{{ '<b>&' }}</p>").unwrap();
        let t = set.finish();
        let ev = Arc::new(event());
        let ctx = Templates::context(&ev);
        assert_eq!(
            t.render_json(&s, &ctx).unwrap(),
            json!({ "html": "<b>& x", "json": "a b", "yaml": "c d", "nested": { "html": ["<i> y"] } })
        );
        assert_eq!(t.render(&html, &ctx).unwrap(), "<p>&lt;b&gt;&amp;</p>");
    }

    #[test]
    fn debug_hides_a_literal() {
        let mut set = TemplateSet::new();
        let id = set
            .text("sinks.kds.headers.Authorization", "Bearer tok-kds-123")
            .unwrap();
        let shown = format!("{id:?}");
        assert!(
            !shown.contains("tok-kds-123") && shown.contains("sinks.kds.headers.Authorization"),
            "{shown}"
        );
    }

    #[test]
    fn money_of_a_missing_amount_renders_empty() {
        let mut set = TemplateSet::new();
        let id = set
            .text(
                "sinks.x.text",
                "[{{ order.nope | money }}][{{ none | money(order.currency) }}]",
            )
            .unwrap();
        let t = set.finish();
        let ev = Arc::new(event());
        assert_eq!(t.render(&id, &Templates::context(&ev)).unwrap(), "[][]");
    }

    #[test]
    fn units_are_whole_and_in_the_currency() {
        assert_eq!(units_filter(Some(2798), None), Some(27));
        assert_eq!(units_filter(Some(2798), Some("USD")), Some(27));
        assert_eq!(units_filter(Some(1200), Some("JPY")), Some(1200));
        assert_eq!(units_filter(Some(27985), Some("KWD")), Some(27));
        assert_eq!(units_filter(Some(-1050), None), Some(-10));
        assert_eq!(units_filter(None, Some("USD")), None);
        let mut set = TemplateSet::new();
        let points = set
            .structured(
                "sinks.l.body",
                &json!({"points": "{{ order.total_cents | units(order.currency) }}"}),
            )
            .unwrap();
        let templates = set.finish();
        let e = Arc::new(event());
        assert_eq!(
            templates.render_json(&points, &templates.context_for(&e)).unwrap(),
            json!({"points": 27})
        );
    }

    #[test]
    fn money_filter_is_exact() {
        assert_eq!(money_filter(Some(2798), None), "27.98");
        assert_eq!(money_filter(Some(5), None), "0.05");
        assert_eq!(money_filter(Some(-1050), None), "-10.50");
        assert_eq!(money_filter(Some(i64::MIN), None), "-92233720368547758.08");
        assert_eq!(money_filter(Some(2798), Some("usd")), "27.98");
        assert_eq!(money_filter(Some(2798), Some("nope")), "27.98");
        assert_eq!(money_filter(Some(1200), Some("JPY")), "1200");
        assert_eq!(money_filter(Some(-1200), Some("RWF")), "-1200");
        assert_eq!(money_filter(Some(1234), Some("KWD")), "1.234");
        assert_eq!(money_filter(Some(5), Some("KWD")), "0.005");
        assert_eq!(money_filter(Some(12345), Some("CLF")), "1.2345");
    }

    #[test]
    fn money_filter_takes_the_currency_in_a_template() {
        let mut set = TemplateSet::new();
        let bare = set.text("t.bare", "{{ order.total_cents | money }}").unwrap();
        let with = set
            .text("t.with", "{{ order.total_cents | money(order.currency) }}")
            .unwrap();
        let missing = set
            .text("t.missing", "{{ order.total_cents | money(order.nope) }}")
            .unwrap();
        let t = set.finish();
        let mut yen = event();
        if let Some(order) = yen.views.order.as_mut() {
            order.total_cents = Some(1200);
            order.currency = Some("JPY".into());
        }
        let ctx = Templates::context(&yen);
        assert_eq!(t.render(&bare, &ctx).unwrap(), "12.00");
        assert_eq!(t.render(&with, &ctx).unwrap(), "1200");
        assert_eq!(t.render(&missing, &ctx).unwrap(), "12.00");
    }

    #[test]
    fn single_expression_detection() {
        assert_eq!(single_expression("{{ order.items }}"), Some("order.items"));
        assert_eq!(single_expression(" {{- x -}} "), Some("x"));
        assert_eq!(single_expression("{{ a }} {{ b }}"), None);
        assert_eq!(single_expression("id: {{ a }}"), None);
    }

    /// Event data cannot make a render run or grow without end: the
    /// render stops with a message that says why.
    #[test]
    fn a_render_is_bounded_by_its_fuel() {
        let mut set = TemplateSet::new();
        let id = set
            .text(
                "sinks.kds.body.units",
                "{% for item in order.items %}{% for _ in range(item.quantity) %}x{% endfor %}{% endfor %}",
            )
            .unwrap();
        let ticket = set
            .text(
                "sinks.kds.body.ticket",
                "{% for item in order.items %}{{ item.name }} x{{ item.quantity }}\n{% endfor %}",
            )
            .unwrap();
        let templates = set.finish();
        let mut big = event();
        big.views.order.as_mut().unwrap().items = vec![
            Item {
                name: Some("Fries".into()),
                quantity: 100_000,
                ..Default::default()
            };
            1_000
        ];
        let big = Arc::new(big);
        let started = std::time::Instant::now();
        let err = templates.render(&id, &templates.context_for(&big)).unwrap_err();
        assert!(err.message.contains("did more than one render may"), "{err:?}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        // An order of a thousand lines renders well within it.
        let rendered = templates.render(&ticket, &templates.context_for(&big)).unwrap();
        assert_eq!(rendered.lines().count(), 1_000);
        let small = Arc::new(event());
        assert_eq!(templates.render(&id, &templates.context_for(&small)).unwrap(), "xx");
    }

    /// Values written into a URL are percent-encoded: event data changes
    /// neither host, port, path nor query; text of the template itself
    /// and a value marked safe are written as they are.
    #[test]
    fn values_in_a_url_are_percent_encoded() {
        let mut set = TemplateSet::new();
        set.escape_values(Escape::Url, |name| name.ends_with(".url"));
        let url = set
            .text(
                "sinks.kds.url",
                "http://{{ payload.host }}.kds.internal:8443/orders/{{ payload.id }}/ack?x={{ payload.q }}",
            )
            .unwrap();
        let safe = set
            .text("sinks.safe.url", "http://h/{{ payload.path | safe }}")
            .unwrap();
        let other = set.text("sinks.kds.body.note", "{{ payload.id }}").unwrap();
        let templates = set.finish();
        let with = |payload: Json| {
            let mut e = event();
            e.payload = payload;
            Arc::new(e)
        };
        let e = with(json!({"host": "127.0.0.1:18998/x?", "id": "a/b c", "q": "1&y=2#f", "path": "p/q"}));
        let ctx = templates.context_for(&e);
        assert_eq!(
            templates.render(&url, &ctx).unwrap(),
            "http://127.0.0.1%3A18998%2Fx%3F.kds.internal:8443/orders/a%2Fb%20c/ack?x=1%26y%3D2%23f"
        );
        assert_eq!(templates.render(&safe, &ctx).unwrap(), "http://h/p/q");
        assert_eq!(templates.render(&other, &ctx).unwrap(), "a/b c", "only the url");
        for climb in ["..", "."] {
            let e = with(json!({"host": "h", "id": climb, "q": 1}));
            let err = templates.render(&url, &templates.context_for(&e)).unwrap_err();
            assert!(err.message.contains("would climb its path"), "{err:?}");
        }
        // `| urlencode` is encoded once, not twice.
        let mut set = TemplateSet::new();
        set.escape_values(Escape::Url, |name| name.ends_with(".url"));
        let query = set
            .text(
                "sinks.q.url",
                "http://h/s?q={{ payload.q | urlencode }}&{{ {'a': 1, 'b': 'x y'} | urlencode }}",
            )
            .unwrap();
        let templates2 = set.finish();
        let e = with(json!({"q": "a b&c"}));
        assert_eq!(
            templates2.render(&query, &templates2.context_for(&e)).unwrap(),
            "http://h/s?q=a%20b%26c&a=1&b=x%20y"
        );
        // Numbers, and a missing or null value, as before.
        let e = with(json!({"host": "h", "id": 42, "q": null}));
        assert_eq!(
            templates.render(&url, &templates.context_for(&e)).unwrap(),
            "http://h.kds.internal:8443/orders/42/ack?x="
        );
    }

    /// Slack's control characters in values are written as entities, in
    /// the text and in a structured leaf that is one expression alike.
    #[test]
    fn values_in_slack_text_are_escaped() {
        let mut set = TemplateSet::new();
        set.escape_values(Escape::Slack, |name| name.ends_with(".text"));
        let text = set
            .text("sinks.alerts.text", "<!here> New order from {{ payload.name }}")
            .unwrap();
        let blocks = set
            .structured(
                "sinks.alerts.blocks",
                &json!([{"type": "section", "text": {"type": "mrkdwn", "text": "{{ payload.name }}"}, "block_id": "{{ payload.name }}"}]),
            )
            .unwrap();
        let templates = set.finish();
        let mut e = event();
        e.payload = json!({"name": "<!channel> <https://evil.example|verify> & co"});
        let e = Arc::new(e);
        let ctx = templates.context_for(&e);
        assert_eq!(
            templates.render(&text, &ctx).unwrap(),
            "<!here> New order from &lt;!channel&gt; &lt;https://evil.example|verify&gt; &amp; co"
        );
        assert_eq!(
            templates.render_json(&blocks, &ctx).unwrap(),
            json!([{"type": "section", "text": {"type": "mrkdwn", "text": "&lt;!channel&gt; &lt;https://evil.example|verify&gt; &amp; co"}, "block_id": "<!channel> <https://evil.example|verify> & co"}])
        );
    }
}
