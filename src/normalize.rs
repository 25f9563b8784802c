//! Parsing and normalization of a verified body: event id, type and time, and
//! the vendor-independent `order` / `payment` / `stock` views.
//!
//! Money is integer minor units, parsed exactly from its decimal text and
//! never through a float.
//!
//! # What is an error
//!
//! Errors become the 400 response body, so they name a field path and never
//! echo body contents.
//!
//! * not JSON / not an object / no id / no type: the event cannot be stored.
//! * an amount that is not exact money (`BadMoney`): the contract rejects it
//!   rather than store a wrong number.
//! * a field of the wrong JSON *type* (a string where an object, array or
//!   integer is expected, a boolean where text is expected: `BadField`).
//!
//! Leniencies, on purpose:
//! * text fields given as JSON numbers are taken as their text (`"id": 42`);
//! * absent or `null` fields are `None` (an absent item quantity is 1);
//! * a stock `quantity` / `reorder_point` that is a fractional number (an
//!   ingredient at 2.5 kg) is `None` in the view, not an error: the payload
//!   still carries it and the event is not refused for it;
//! * an unparseable `occurred_at` is `None`.

use std::borrow::Cow;
use std::fmt;

use expeditor_api::{Customer, Item, Modifier, Order, Payment, Stock, Views};
use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

// ---------------------------------------------------------------------------
// The parsed body

/// A JSON document as normalization reads it: strings borrow from the body
/// unless they hold escapes, and an object is a short list of its entries.
/// Normalization reads a few dozen fields; a `serde_json::Value` (an
/// `IndexMap` per object, a `String` per key and text) costs several times
/// as much to build and drop, and most events never need one: only a `when`
/// route or a sink that gets the event right away turns it into a `Value`.
#[derive(Debug, Clone, PartialEq)]
pub enum Json<'a> {
    Null,
    Bool(bool),
    Number(Number),
    String(Cow<'a, str>),
    Array(Vec<Json<'a>>),
    /// In body order; a key given twice means its last value, as in `Value`.
    /// Lookups scan the list: vendor objects have a few dozen keys, and a
    /// body is signed and capped at `max_body`, so even a contrived wide
    /// object costs milliseconds, not more.
    Object(Vec<(Cow<'a, str>, Json<'a>)>),
}

impl<'a> Json<'a> {
    /// Parses a body; the same documents as `serde_json::from_slice::<Value>`
    /// are accepted, with the same nesting limit. The body's UTF-8 is checked
    /// once, up front: parsing from a slice checks each string on its own
    /// (about a fifth of the parse, by callgrind), and JSON that is not
    /// UTF-8 is refused either way (with from_slice's error, below).
    pub fn parse(body: &'a [u8]) -> serde_json::Result<Json<'a>> {
        match std::str::from_utf8(body) {
            Ok(text) => serde_json::from_str(text),
            Err(_) => serde_json::from_slice(body),
        }
    }

    fn is_null(&self) -> bool {
        matches!(self, Json::Null)
    }

    /// The entry `key` of an object (its last one).
    pub fn get(&self, key: &str) -> Option<&Json<'a>> {
        match self {
            Json::Object(entries) => entries.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The `serde_json::Value` the body parses to.
    pub fn into_value(self) -> Value {
        match self {
            Json::Null => Value::Null,
            Json::Bool(b) => Value::Bool(b),
            Json::Number(n) => Value::Number(n),
            Json::String(s) => Value::String(s.into_owned()),
            Json::Array(list) => Value::Array(list.into_iter().map(Json::into_value).collect()),
            Json::Object(entries) => {
                let mut map = Map::with_capacity(entries.len());
                for (k, v) in entries {
                    map.insert(k.into_owned(), v.into_value());
                }
                Value::Object(map)
            }
        }
    }
}

impl<'de> Deserialize<'de> for Json<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(JsonVisitor)
    }
}

struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Json<'de>, E> {
        Ok(Json::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Json<'de>, E> {
        Ok(Json::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Json<'de>, E> {
        Ok(Json::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Json<'de>, E> {
        // What `Value` does: JSON text never holds a NaN or an infinity.
        Ok(Number::from_f64(v).map_or(Json::Null, Json::Number))
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Json<'de>, E> {
        Ok(Json::String(Cow::Borrowed(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Json<'de>, E> {
        Ok(Json::String(Cow::Owned(v.to_owned())))
    }

    fn visit_string<E>(self, v: String) -> Result<Json<'de>, E> {
        Ok(Json::String(Cow::Owned(v)))
    }

    fn visit_unit<E>(self) -> Result<Json<'de>, E> {
        Ok(Json::Null)
    }

    fn visit_none<E>(self) -> Result<Json<'de>, E> {
        Ok(Json::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Json<'de>, D::Error> {
        Json::deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json<'de>, A::Error> {
        let mut list = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(v) = seq.next_element()? {
            list.push(v);
        }
        Ok(Json::Array(list))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json<'de>, A::Error> {
        let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0));
        while let Some(Key(k)) = map.next_key()? {
            entries.push((k, map.next_value()?));
        }
        Ok(Json::Object(entries))
    }
}

/// An object key, borrowed from the body when it has no escapes (serde's own
/// `Cow<str>` always copies).
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

// ---------------------------------------------------------------------------
// Money

/// Why a money string is not exact money.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("empty amount")]
    Empty,
    #[error("not a plain decimal amount")]
    Syntax,
    #[error("more decimals than the currency has")]
    TooPrecise,
    #[error("amount out of range")]
    Overflow,
    #[error("a JSON number with more digits than it can carry exactly; send it as a string")]
    Inexact,
}

pub use expeditor_api::currency_exponent;

/// An exact decimal amount (`"27.98"`) to integer minor units (`2798`) of
/// `currency` (see [`currency_exponent`]).
///
/// Accepted: `-?DIGITS(.DIGITS)?`. Rejected: empty, whitespace anywhere,
/// `+`, thousands separators, exponents, `"."`, `"5."`, `".5"`, more
/// decimals than the currency has unless the extra ones are zeros
/// (`"27.980"` is 2798, `"27.985"` is an error), and values outside `i64`.
pub fn parse_minor_units(s: &str, currency: Option<&str>) -> Result<i64, MoneyError> {
    parse_decimal(s, currency_exponent(currency))
}

/// A JSON money value: a decimal string, or a JSON number taken through its
/// textual form (`serde_json::Number::to_string`, never `as_f64`).
///
/// serde_json keeps non-integer numbers as `f64` and prints them as the
/// shortest text that reads back to the same `f64`, which is the sender's
/// text for any amount with up to 15 significant digits.
pub fn json_minor_units(value: &Json<'_>, currency: Option<&str>) -> Result<i64, MoneyError> {
    match value {
        Json::String(s) => parse_minor_units(s, currency),
        Json::Number(n) => parse_minor_units(&exact_text(n).ok_or(MoneyError::Inexact)?, currency),
        _ => Err(MoneyError::Syntax),
    }
}

fn parse_decimal(s: &str, exponent: u32) -> Result<i64, MoneyError> {
    if s.is_empty() {
        return Err(MoneyError::Empty);
    }
    let (negative, unsigned) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (int, frac) = match unsigned.split_once('.') {
        Some((int, frac)) => (int, frac),
        None => (unsigned, ""),
    };
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    if !digits(int) || (unsigned.contains('.') && !digits(frac)) {
        return Err(MoneyError::Syntax);
    }
    let exponent = exponent as usize;
    let (kept, extra) = frac.split_at(frac.len().min(exponent));
    if extra.bytes().any(|b| b != b'0') {
        return Err(MoneyError::TooPrecise);
    }
    let mut value: i64 = 0;
    let push = |value: i64, digit: u8| {
        value
            .checked_mul(10)
            .and_then(|v| v.checked_add(i64::from(digit - b'0')))
            .ok_or(MoneyError::Overflow)
    };
    for b in int.bytes().chain(kept.bytes()) {
        value = push(value, b)?;
    }
    for _ in kept.len()..exponent {
        value = push(value, b'0')?;
    }
    Ok(if negative { -value } else { value })
}

/// An integral JSON number (`42`, `42.0`), exactly; anything else `None`.
fn integral(n: &serde_json::Number) -> Option<i64> {
    n.as_i64().or_else(|| parse_decimal(&exact_text(n)?, 0).ok())
}

/// Most significant digits any `f64` holds exactly as decimal text.
const F64_EXACT_DIGITS: usize = 15;

/// A JSON number's text where it is the sender's: an integer as sent, or a
/// number serde_json read as a float (a fraction, an exponent, an integer
/// past 64 bits) with at most 15 significant digits, which the shortest
/// text of the float gives back. `None` for more: the float rounded it, and
/// two different ids or amounts could come out the same.
fn exact_text(n: &Number) -> Option<String> {
    let text = n.to_string();
    if let Some(v) = n.as_f64().filter(|_| n.is_f64()) {
        // Past 2^53 neighbouring integers share a float: 20000000000000000001
        // comes out 2e19, as 20000000000000000000 does.
        let mantissa = text.split(['e', 'E']).next().unwrap_or_default();
        let digits = mantissa.trim_matches(|c: char| c == '0' || c == '-' || c == '.');
        if v.abs() >= 9_007_199_254_740_992.0 || digits.bytes().filter(u8::is_ascii_digit).count() > F64_EXACT_DIGITS {
            return None;
        }
    }
    Some(text)
}

// ---------------------------------------------------------------------------
// Errors

/// Why a verified body cannot be accepted. `Display` is client-safe: it names
/// at most a field path, never body contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NormalizeError {
    NotJson,
    NotObject,
    MissingId,
    MissingType,
    BadMoney { field: String },
    BadField { field: String },
}

impl fmt::Display for NormalizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NormalizeError::NotJson => f.write_str("body is not valid JSON"),
            NormalizeError::NotObject => f.write_str("body is not a JSON object"),
            NormalizeError::MissingId => f.write_str("event id missing"),
            NormalizeError::MissingType => f.write_str("event type missing"),
            NormalizeError::BadMoney { field } => write!(f, "invalid amount in {field}"),
            NormalizeError::BadField { field } => write!(f, "invalid value in {field}"),
        }
    }
}

impl std::error::Error for NormalizeError {}

fn bad_field(field: impl Into<String>) -> NormalizeError {
    NormalizeError::BadField { field: field.into() }
}

fn bad_money(field: impl Into<String>) -> NormalizeError {
    NormalizeError::BadMoney { field: field.into() }
}

// ---------------------------------------------------------------------------
// Field paths

/// A dotted path into the JSON body, e.g. `data.object.id`. A segment that is
/// a number also indexes arrays (`data.items.0.id`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldPath {
    segments: Vec<String>,
}

impl FieldPath {
    pub fn parse(path: &str) -> Result<FieldPath, String> {
        if path.is_empty() {
            return Err("field path is empty".to_owned());
        }
        let segments: Vec<String> = path.split('.').map(str::to_owned).collect();
        if segments.iter().any(String::is_empty) {
            return Err(format!(
                "field path {path:?} has an empty segment (use dots only between names)"
            ));
        }
        Ok(FieldPath { segments })
    }

    /// Whether `other` lies inside the value at this path (this path is a
    /// strict prefix of it): then no one body gives both a text or number.
    pub fn holds(&self, other: &FieldPath) -> bool {
        other.segments.len() > self.segments.len() && other.segments.starts_with(&self.segments)
    }

    /// The value at this path; `None` when absent (or `null`).
    pub fn lookup<'v, 'a>(&self, root: &'v Json<'a>) -> Option<&'v Json<'a>> {
        let mut cur = root;
        for seg in &self.segments {
            cur = match cur {
                Json::Object(_) => cur.get(seg)?,
                Json::Array(list) => list.get(seg.parse::<usize>().ok()?)?,
                _ => return None,
            };
        }
        (!cur.is_null()).then_some(cur)
    }

    /// Puts `value` at this path in `root`, so that [`lookup`](Self::lookup)
    /// finds it: missing objects on the way are made, an array is indexed by
    /// a number segment within it, and anything else in the way is replaced
    /// by an object. For building a body a source will read (`expeditor
    /// send`), not for reading one.
    pub fn set(&self, root: &mut Value, value: Value) {
        let mut cur = root;
        for seg in &self.segments {
            let index = match &*cur {
                Value::Array(list) => seg.parse::<usize>().ok().filter(|&i| i < list.len()),
                _ => None,
            };
            cur = match index {
                Some(i) => &mut cur[i],
                None => {
                    if !cur.is_object() {
                        *cur = Value::Object(Map::new());
                    }
                    cur.as_object_mut()
                        .expect("made an object above")
                        .entry(seg.clone())
                        .or_insert(Value::Null)
                }
            };
        }
        *cur = value;
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.segments.join("."))
    }
}

// ---------------------------------------------------------------------------
// Normalization

/// A parsed, normalized event. It borrows the body it was read from.
#[derive(Debug, Clone, PartialEq)]
pub struct Normalized<'a> {
    pub id: String,
    pub event_type: String,
    pub occurred_at: Option<jiff::Timestamp>,
    /// The vendor's JSON as parsed; `payload` makes it a `Value`.
    pub document: Json<'a>,
    pub views: Views,
}

impl Normalized<'_> {
    /// The vendor's JSON as a `serde_json::Value`, for templates and sinks.
    pub fn payload(&self) -> Value {
        self.document.clone().into_value()
    }
}

/// How a source kind's bodies are read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Normalizer {
    CrumbPos,
    Crave,
    Hmac {
        id_field: FieldPath,
        type_field: FieldPath,
        time_field: Option<FieldPath>,
    },
}

impl Normalizer {
    /// The `hmac` kind with the default fields `id`, `type`, `created_at`.
    pub fn hmac_defaults() -> Normalizer {
        let path = |p: &str| FieldPath {
            segments: vec![p.to_owned()],
        };
        Normalizer::Hmac {
            id_field: path("id"),
            type_field: path("type"),
            time_field: Some(path("created_at")),
        }
    }

    /// The event id of a body that [`Self::normalize`] refused, if it has
    /// one that reads: for the log line that says which event was refused
    /// (the body is not kept). Parses the body again; only a refusal that
    /// is logged pays.
    pub fn event_id_of(&self, body: &[u8]) -> Option<String> {
        let document = Json::parse(body).ok()?;
        let value = match self {
            Normalizer::CrumbPos | Normalizer::Crave => document.get("id"),
            Normalizer::Hmac { id_field, .. } => id_field.lookup(&document),
        };
        event_id(value, "id").ok()
    }

    pub fn normalize<'a>(&self, body: &'a [u8]) -> Result<Normalized<'a>, NormalizeError> {
        let document = Json::parse(body).map_err(|_| NormalizeError::NotJson)?;
        let Json::Object(root) = &document else {
            return Err(NormalizeError::NotObject);
        };
        let (id, event_type, occurred_at, views) = match self {
            Normalizer::CrumbPos => {
                let id = event_id(document.get("id"), "id")?;
                let event_type = event_type(document.get("type"), "type")?;
                let occurred_at = timestamp(document.get("created_at"));
                let views = crumbpos_views(root, &event_type)?;
                (id, event_type, occurred_at, views)
            }
            Normalizer::Crave => {
                let id = event_id(document.get("id"), "id")?;
                let event_type = event_type(document.get("type"), "type")?;
                let occurred_at = timestamp(document.get("createdAt"));
                let views = crave_views(root, &event_type)?;
                (id, event_type, occurred_at, views)
            }
            Normalizer::Hmac {
                id_field,
                type_field,
                time_field,
            } => {
                let id = event_id(id_field.lookup(&document), &id_field.to_string())?;
                let event_type = event_type(type_field.lookup(&document), &type_field.to_string())?;
                let occurred_at = time_field.as_ref().and_then(|f| timestamp(f.lookup(&document)));
                (id, event_type, occurred_at, Views::default())
            }
        };
        Ok(Normalized {
            id,
            event_type,
            occurred_at,
            document,
            views,
        })
    }
}

/// The longest event id or type taken, in bytes. Vendors' ids are a few
/// dozen characters; PostgreSQL's dedupe index cannot hold a key much over
/// 2.7 KB, so a longer one would be refused with a 503 on every retry.
pub const MAX_ID_BYTES: usize = 1024;

/// A non-empty id of at most [`MAX_ID_BYTES`]; a JSON number is taken as its
/// text. Control characters (a NUL, escaped as `\u0000`) are refused: no
/// vendor sends them, a terminal or log line would show them raw, and
/// PostgreSQL cannot store a NUL in text, so such an event would be refused
/// on every retry with a 503. So are Unicode's bidirectional controls,
/// which make the text around them read in another order in a terminal
/// (`expeditor events`, a log line): an id could pass for another one.
fn event_id(value: Option<&Json<'_>>, field: &str) -> Result<String, NormalizeError> {
    match value {
        None | Some(Json::Null) => Err(NormalizeError::MissingId),
        Some(Json::String(s)) if s.is_empty() => Err(NormalizeError::MissingId),
        Some(Json::String(s)) if s.len() > MAX_ID_BYTES || s.chars().any(unprintable) => Err(bad_field(field)),
        Some(Json::String(s)) => Ok(s.to_string()),
        Some(Json::Number(n)) => exact_text(n).ok_or_else(|| bad_field(field)),
        Some(_) => Err(bad_field(field)),
    }
}

/// A non-empty type string, without control characters, of at most
/// [`MAX_ID_BYTES`] (as an id).
fn event_type(value: Option<&Json<'_>>, field: &str) -> Result<String, NormalizeError> {
    match value {
        None | Some(Json::Null) => Err(NormalizeError::MissingType),
        Some(Json::String(s)) if s.is_empty() => Err(NormalizeError::MissingType),
        Some(Json::String(s)) if s.len() > MAX_ID_BYTES || s.chars().any(unprintable) => Err(bad_field(field)),
        Some(Json::String(s)) => Ok(s.to_string()),
        Some(_) => Err(bad_field(field)),
    }
}

/// Not for an event's id or type: a control character, or one of Unicode's
/// bidirectional formatting characters (the marks, embeddings, overrides
/// and isolates, and the Arabic letter mark).
fn unprintable(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// RFC 3339 text (`Z` or an offset), or integer unix seconds; anything else
/// is `None`.
fn timestamp(value: Option<&Json<'_>>) -> Option<jiff::Timestamp> {
    match value? {
        Json::String(s) => s.parse::<jiff::Timestamp>().ok(),
        Json::Number(n) => jiff::Timestamp::from_second(n.as_i64()?).ok(),
        _ => None,
    }
}

/// Where an object sits in the body. Spelled out only for an error message,
/// so reading a valid event builds no path strings.
#[derive(Clone, Copy)]
enum Path<'p> {
    Root,
    Field(&'p Path<'p>, &'p str),
    Element(&'p Path<'p>, &'p str, usize),
}

impl Path<'_> {
    fn write(&self, out: &mut String) {
        match *self {
            Path::Root => {}
            Path::Field(parent, key) => {
                parent.write(out);
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Path::Element(parent, key, i) => {
                Path::Field(parent, key).write(out);
                out.push_str(&format!("[{i}]"));
            }
        }
    }

    fn spelled(&self) -> String {
        let mut out = String::new();
        self.write(&mut out);
        out
    }
}

/// A JSON object with its path, for typed field access with error paths.
struct Obj<'v, 'p> {
    map: &'v [(Cow<'v, str>, Json<'v>)],
    path: Path<'p>,
}

impl<'v, 'p> Obj<'v, 'p> {
    fn new(map: &'v [(Cow<'v, str>, Json<'v>)], path: Path<'p>) -> Self {
        Obj { map, path }
    }

    fn path_of(&self, key: &str) -> String {
        Path::Field(&self.path, key).spelled()
    }

    /// Absent and `null` are both `None`.
    fn get(&self, key: &str) -> Option<&'v Json<'v>> {
        // The last of a repeated key, as `serde_json::Value` keeps it.
        self.map
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
            .filter(|v| !v.is_null())
    }

    fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Text; a number is taken as its text.
    fn string(&self, key: &str) -> Result<Option<String>, NormalizeError> {
        match self.get(key) {
            None => Ok(None),
            Some(Json::String(s)) => Ok(Some(s.to_string())),
            Some(Json::Number(n)) => exact_text(n).map(Some).ok_or_else(|| bad_field(self.path_of(key))),
            Some(_) => Err(bad_field(self.path_of(key))),
        }
    }

    fn object(&self, key: &'static str) -> Result<Option<Obj<'v, '_>>, NormalizeError> {
        match self.get(key) {
            None => Ok(None),
            Some(Json::Object(map)) => Ok(Some(Obj::new(map, Path::Field(&self.path, key)))),
            Some(_) => Err(bad_field(self.path_of(key))),
        }
    }

    /// Absent or `null` is empty.
    fn array(&self, key: &str) -> Result<&'v [Json<'v>], NormalizeError> {
        match self.get(key) {
            None => Ok(&[]),
            Some(Json::Array(list)) => Ok(list),
            Some(_) => Err(bad_field(self.path_of(key))),
        }
    }

    /// An integral number (`3`, `3.0`); anything else is `BadField`.
    fn integer(&self, key: &str) -> Result<Option<i64>, NormalizeError> {
        match self.get(key) {
            None => Ok(None),
            Some(Json::Number(n)) => integral(n).map(Some).ok_or_else(|| bad_field(self.path_of(key))),
            Some(_) => Err(bad_field(self.path_of(key))),
        }
    }

    /// A number; a fractional one is `None`; a non-number is `BadField`.
    fn loose_integer(&self, key: &str) -> Result<Option<i64>, NormalizeError> {
        match self.get(key) {
            None => Ok(None),
            Some(Json::Number(n)) => Ok(integral(n)),
            Some(_) => Err(bad_field(self.path_of(key))),
        }
    }

    /// Integer minor units given as a JSON integer (CrumbPOS); anything else
    /// is `BadMoney`.
    fn cents(&self, key: &str) -> Result<Option<i64>, NormalizeError> {
        match self.get(key) {
            None => Ok(None),
            Some(Json::Number(n)) => integral(n).map(Some).ok_or_else(|| bad_money(self.path_of(key))),
            Some(_) => Err(bad_money(self.path_of(key))),
        }
    }

    /// A decimal amount, string or number, in `currency` (Crave).
    fn money(&self, key: &str, currency: Option<&str>) -> Result<Option<i64>, NormalizeError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => json_minor_units(v, currency)
                .map(Some)
                .map_err(|_| bad_money(self.path_of(key))),
        }
    }

    /// Item quantity: absent is 1; otherwise an integral number.
    fn quantity(&self, key: &str) -> Result<i64, NormalizeError> {
        Ok(self.integer(key)?.unwrap_or(1))
    }

    /// The objects of array `key`, with their element paths.
    fn objects(&self, key: &'static str) -> Result<Vec<Obj<'v, '_>>, NormalizeError> {
        self.array(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let path = Path::Element(&self.path, key, i);
                match v {
                    Json::Object(map) => Ok(Obj::new(map, path)),
                    _ => Err(bad_field(path.spelled())),
                }
            })
            .collect()
    }

    /// Modifiers of an item: objects `{id, name, price}`, or bare strings
    /// (names). `price` is read by `price`.
    fn modifiers(
        &self,
        key: &'static str,
        price: impl Fn(&Obj<'v, '_>, &'static str) -> Result<Option<i64>, NormalizeError>,
    ) -> Result<Vec<Modifier>, NormalizeError> {
        self.array(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Json::String(name) => Ok(Modifier {
                    name: Some(name.to_string()),
                    ..Modifier::default()
                }),
                Json::Object(map) => {
                    let m = Obj::new(map, Path::Element(&self.path, key, i));
                    Ok(Modifier {
                        id: m.string("id")?,
                        name: m.string("name")?,
                        price_cents: price(&m, "price")?,
                    })
                }
                _ => Err(bad_field(Path::Element(&self.path, key, i).spelled())),
            })
            .collect()
    }
}

fn customer(id: Option<String>, name: Option<String>, email: Option<String>) -> Option<Customer> {
    (id.is_some() || name.is_some() || email.is_some()).then_some(Customer { id, name, email })
}

// ---------------------------------------------------------------------------
// CrumbPOS

fn crumbpos_views(root: &[(Cow<'_, str>, Json<'_>)], event_type: &str) -> Result<Views, NormalizeError> {
    let root = Obj::new(root, Path::Root);
    let Some(data) = root.object("data")? else {
        return Ok(Views::default());
    };
    let data_type = data.string("type")?;
    let attrs_map;
    let attrs = match data.object("attributes")? {
        Some(a) => a,
        None => {
            attrs_map = Vec::new();
            Obj::new(&attrs_map, Path::Field(&data.path, "attributes"))
        }
    };
    let data_type = data_type.as_deref();
    let mut views = Views::default();
    if data_type == Some("order") || event_type.starts_with("order.") {
        views.order = Some(crumbpos_order(&data, &attrs)?);
    }
    if data_type == Some("payment") || event_type.starts_with("payment.") {
        views.payment = Some(Payment {
            id: data.string("id")?,
            order_id: attrs.string("order_id")?,
            amount_cents: attrs.cents("amount")?,
            tip_cents: attrs.cents("tip")?,
            method: attrs.string("method")?,
            card_brand: attrs.string("card_brand")?,
            card_last_four: attrs.string("card_last_four")?,
            status: attrs.string("status")?,
        });
    }
    if event_type.starts_with("inventory.") || matches!(data_type, Some("inventory" | "inventory_item" | "stock")) {
        let item_id = match attrs.string("item_id")? {
            Some(id) => Some(id),
            None => match attrs.string("menu_item_id")? {
                Some(id) => Some(id),
                None => data.string("id")?,
            },
        };
        views.stock = Some(Stock {
            item_id,
            name: attrs.string("name")?,
            location_id: attrs.string("location_id")?,
            quantity: attrs.loose_integer("quantity")?,
            reorder_point: attrs.loose_integer("reorder_point")?,
        });
    }
    Ok(views)
}

fn crumbpos_order(data: &Obj<'_, '_>, attrs: &Obj<'_, '_>) -> Result<Order, NormalizeError> {
    // A nested `customer` object wins field by field over the flat fields.
    let nested = attrs.object("customer")?;
    let pick = |nested_key: &str, flat_key: &str| -> Result<Option<String>, NormalizeError> {
        if let Some(c) = &nested
            && let Some(v) = c.string(nested_key)?
        {
            return Ok(Some(v));
        }
        attrs.string(flat_key)
    };
    let customer = customer(
        pick("id", "customer_id")?,
        pick("name", "customer_name")?,
        pick("email", "customer_email")?,
    );
    let items = attrs
        .objects("items")?
        .iter()
        .map(crumbpos_item)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Order {
        id: data.string("id")?,
        location_id: attrs.string("location_id")?,
        status: attrs.string("status")?,
        channel: attrs.string("source")?,
        total_cents: attrs.cents("total")?,
        tax_cents: attrs.cents("tax")?,
        tip_cents: attrs.cents("tip")?,
        currency: attrs.string("currency")?.map(|c| c.to_ascii_lowercase()),
        customer,
        items,
    })
}

fn crumbpos_item(item: &Obj<'_, '_>) -> Result<Item, NormalizeError> {
    let quantity = item.quantity("quantity")?;
    let price = item.cents("price")?;
    let modifiers = item.modifiers("modifiers", |m, key| m.cents(key))?;
    // (price + modifier prices) * quantity; a modifier without a price is free.
    let total = match price {
        None => None,
        Some(price) => Some(
            modifiers
                .iter()
                .try_fold(price, |sum, m| sum.checked_add(m.price_cents.unwrap_or(0)))
                .and_then(|unit| unit.checked_mul(quantity))
                .ok_or_else(|| bad_money(item.path_of("price")))?,
        ),
    };
    Ok(Item {
        name: item.string("name")?,
        quantity,
        unit_price_cents: price,
        total_cents: total,
        modifiers,
    })
}

// ---------------------------------------------------------------------------
// Crave

fn crave_views(root: &[(Cow<'_, str>, Json<'_>)], event_type: &str) -> Result<Views, NormalizeError> {
    let status = if let Some(status) = event_type.strip_prefix("order.") {
        status
    } else if event_type == "cart.abandoned" {
        "abandoned"
    } else {
        return Ok(Views::default());
    };
    let root = Obj::new(root, Path::Root);
    let Some(data) = root.object("data")? else {
        return Ok(Views::default());
    };
    let currency = data.string("currency")?;
    let cur = currency.as_deref();
    let items = data
        .objects("items")?
        .iter()
        .map(|item| crave_item(item, cur))
        .collect::<Result<Vec<_>, _>>()?;
    let order = Order {
        id: data.string("orderId")?,
        location_id: data.string("locationId")?,
        status: Some(status.to_owned()),
        channel: data.string("fulfillmentMethod")?,
        total_cents: data.money("total", cur)?,
        tax_cents: data.money("tax", cur)?,
        tip_cents: data.money("tip", cur)?,
        currency: currency.as_ref().map(|c| c.to_ascii_lowercase()),
        customer: customer(
            data.string("customerId")?,
            data.string("customerName")?,
            data.string("customerEmail")?,
        ),
        items,
    };
    Ok(Views {
        order: Some(order),
        ..Views::default()
    })
}

fn crave_item(item: &Obj<'_, '_>, currency: Option<&str>) -> Result<Item, NormalizeError> {
    let quantity = item.quantity("quantity")?;
    let total = item.money("total", currency)?;
    let price_key = if item.has("price") { "price" } else { "unitPrice" };
    let unit = match item.money(price_key, currency)? {
        Some(unit) => Some(unit),
        // Derived only when exact.
        None => total.and_then(|t| (quantity != 0 && t.checked_rem(quantity) == Some(0)).then(|| t / quantity)),
    };
    Ok(Item {
        name: item.string("name")?,
        quantity,
        unit_price_cents: unit,
        total_cents: total,
        modifiers: item.modifiers("modifiers", |m, key| m.money(key, currency))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const CRUMB_ORDER: &str = include_str!("../tests/fixtures/crumbpos-order-created.json");

    const CRUMB_PAYMENT: &str = include_str!("../tests/fixtures/crumbpos-payment-completed.json");

    const CRAVE_ORDER: &str = include_str!("../tests/fixtures/crave-order-created.json");

    fn ts(s: &str) -> Option<jiff::Timestamp> {
        Some(s.parse().unwrap())
    }

    fn s(v: &str) -> Option<String> {
        Some(v.to_owned())
    }

    /// A body for the test's whole run: `Normalized` borrows it.
    fn body_of(v: &Value) -> &'static [u8] {
        Box::leak(serde_json::to_vec(v).unwrap().into_boxed_slice())
    }

    fn norm(n: &Normalizer, v: &Value) -> Result<Normalized<'static>, NormalizeError> {
        n.normalize(body_of(v))
    }

    /// A `Value` as the `Json` the same text parses to.
    fn doc(v: &Value) -> Json<'static> {
        Json::parse(body_of(v)).unwrap()
    }

    // -- the parsed document ---------------------------------------------------

    #[test]
    fn a_field_path_sets_what_its_lookup_finds() {
        let path = |p: &str| FieldPath::parse(p).unwrap();
        let mut root = json!({"a": "scalar", "list": [{"x": 1}, {"x": 2}], "keep": true});
        let cases = [
            ("new.deep.key", json!("made")),
            ("a.b", json!(2)),
            ("list.1.x", json!(20)),
            ("top", json!({"whole": "object"})),
        ];
        for (p, value) in &cases {
            path(p).set(&mut root, value.clone());
        }
        let body = serde_json::to_vec(&root).unwrap();
        let doc = Json::parse(&body).unwrap();
        for (p, value) in cases {
            let found = path(p).lookup(&doc).map(|j| j.clone().into_value());
            assert_eq!(found, Some(value), "{p} in {root}");
        }
        assert_eq!(root["list"][0], json!({"x": 1}), "{root}");
        assert_eq!(root["keep"], json!(true), "{root}");
    }

    #[test]
    fn documents_become_the_value_serde_json_parses() {
        let texts = [
            CRUMB_ORDER,
            CRUMB_PAYMENT,
            CRAVE_ORDER,
            r#"{"a\"b":"c\nd","\u00e9t\u00e9":"\ud83c\udf54","plain":"x"}"#,
            r#"{"k":1,"other":2,"k":3}"#,
            r#"[18446744073709551615,-9223372036854775808,1.5,-0.0,1e300,12.50,0]"#,
            r#"{"nested":{"list":[[],{},[null,true,false]],"empty":""}}"#,
            r#""just a string""#,
            "null",
        ];
        for text in texts {
            let expected: Value = serde_json::from_str(text).unwrap();
            let parsed = Json::parse(text.as_bytes()).unwrap();
            assert_eq!(parsed.into_value(), expected, "{text}");
        }
        // A repeated key means its last value, in its first place (as `Value`).
        let doc = Json::parse(br#"{"k":1,"other":2,"k":3}"#).unwrap();
        assert_eq!(doc.get("k"), Some(&Json::Number(3.into())));
        let keys: Vec<String> = doc.into_value().as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, ["k", "other"]);
        // Text without escapes is borrowed from the body, not copied.
        let doc = Json::parse(br#"{"id":"evt_1","esc":"a\nb"}"#).unwrap();
        assert!(matches!(doc.get("id"), Some(Json::String(Cow::Borrowed("evt_1")))));
        assert!(matches!(doc.get("esc"), Some(Json::String(Cow::Owned(s))) if s == "a\nb"));
    }

    #[test]
    fn documents_refuse_what_serde_json_refuses() {
        let deep = "[".repeat(200) + &"]".repeat(200);
        for text in [
            "",
            "{",
            r#"{"a":}"#,
            "[1,]",
            "nul",
            r#"{"a":1}x"#,
            "\"\\x\"",
            deep.as_str(),
        ] {
            assert!(
                serde_json::from_str::<Value>(text).is_err(),
                "serde_json takes {text:?}"
            );
            assert!(Json::parse(text.as_bytes()).is_err(), "{text:?} parsed");
        }
        let ok = "[".repeat(100) + &"]".repeat(100);
        assert!(Json::parse(ok.as_bytes()).is_ok());
        // Bytes that are not UTF-8, in a string or outside one.
        let not_utf8: [&[u8]; 4] = [
            b"{\"a\":\"\xff\"}",
            b"{\"a\xc3\":1}",
            b"[1,\xe2\x82]",
            b"\xef\xbb\xbf{}",
        ];
        for bytes in not_utf8 {
            assert!(
                serde_json::from_slice::<Value>(bytes).is_err(),
                "serde_json takes {bytes:?}"
            );
            assert!(Json::parse(bytes).is_err(), "{bytes:?} parsed");
        }
        let doc = Json::parse("{\"name\":\"Zo\u{eb} \u{1f355}\"}".as_bytes()).unwrap();
        assert!(matches!(
            doc.get("name"),
            Some(Json::String(Cow::Borrowed("Zo\u{eb} \u{1f355}")))
        ));
    }

    #[test]
    fn a_repeated_field_reads_its_last_value() {
        let body = br#"{"id":"evt_1","type":"order.created","data":{"type":"order","id":"o1",
            "attributes":{"total":100,"total":2500,"items":[]}}}"#;
        let n = Normalizer::CrumbPos.normalize(body).unwrap();
        assert_eq!(n.views.order.unwrap().total_cents, Some(2500));
    }

    // -- money --------------------------------------------------------------

    #[test]
    fn money_parses_exactly() {
        let ok = [
            ("27.98", 2798),
            ("5", 500),
            ("0.1", 10),
            ("-3.50", -350),
            ("27.980", 2798),
            ("27.9800000", 2798),
            ("0", 0),
            ("-0", 0),
            ("0.00", 0),
            ("007.05", 705),
            ("0.01", 1),
            ("92233720368547758.07", i64::MAX),
            ("-92233720368547758.07", -i64::MAX),
        ];
        for (text, cents) in ok {
            assert_eq!(parse_minor_units(text, None), Ok(cents), "{text}");
            assert_eq!(parse_minor_units(text, Some("usd")), Ok(cents), "{text}");
        }
    }

    #[test]
    fn money_rejects_everything_else() {
        use MoneyError::*;
        let bad = [
            ("", Empty),
            ("abc", Syntax),
            ("1,000.00", Syntax),
            ("1e3", Syntax),
            ("1E3", Syntax),
            (" 5", Syntax),
            ("5 ", Syntax),
            (".", Syntax),
            ("5.", Syntax),
            (".5", Syntax),
            ("-", Syntax),
            ("-.5", Syntax),
            ("+5", Syntax),
            ("--5", Syntax),
            ("5.0.0", Syntax),
            ("$5", Syntax),
            ("NaN", Syntax),
            ("inf", Syntax),
            ("١٢", Syntax), // non-ASCII digits
            ("27.985", TooPrecise),
            ("27.9801", TooPrecise),
            ("0.001", TooPrecise),
            ("92233720368547758.08", Overflow),
            ("99999999999999999999", Overflow),
        ];
        for (text, err) in bad {
            assert_eq!(parse_minor_units(text, None), Err(err), "{text:?}");
        }
    }

    #[test]
    fn money_follows_the_currency_exponent() {
        assert_eq!(parse_minor_units("1500", Some("JPY")), Ok(1500));
        assert_eq!(parse_minor_units("1500", Some("jpy")), Ok(1500));
        assert_eq!(parse_minor_units("1500.00", Some("jpy")), Ok(1500));
        assert_eq!(parse_minor_units("1500.5", Some("jpy")), Err(MoneyError::TooPrecise));
        for code in [
            "BIF", "CLP", "DJF", "GNF", "ISK", "KMF", "KRW", "PYG", "RWF", "UGX", "UYI", "VND", "VUV", "XAF", "XOF",
            "XPF",
        ] {
            assert_eq!(currency_exponent(Some(code)), 0, "{code}");
            assert_eq!(currency_exponent(Some(&code.to_lowercase())), 0, "{code}");
        }
        for code in ["BHD", "KWD", "JOD", "OMR", "TND", "IQD", "LYD"] {
            assert_eq!(currency_exponent(Some(code)), 3, "{code}");
        }
        assert_eq!(parse_minor_units("1.5", Some("kwd")), Ok(1500));
        assert_eq!(parse_minor_units("1.234", Some("KWD")), Ok(1234));
        assert_eq!(parse_minor_units("1.2345", Some("KWD")), Err(MoneyError::TooPrecise));
        assert_eq!(parse_minor_units("1.2340", Some("KWD")), Ok(1234));
        assert_eq!(parse_minor_units("1500", Some("RWF")), Ok(1500));
        for code in ["CLF", "UYW"] {
            assert_eq!(currency_exponent(Some(code)), 4, "{code}");
        }
        assert_eq!(parse_minor_units("1.2345", Some("CLF")), Ok(12345));
        assert_eq!(parse_minor_units("1.23456", Some("CLF")), Err(MoneyError::TooPrecise));
        for code in [None, Some("usd"), Some("EUR"), Some("xyz"), Some("")] {
            assert_eq!(currency_exponent(code), 2, "{code:?}");
        }
    }

    #[test]
    fn money_from_json_numbers_goes_through_text() {
        let cases = [
            (json!(27.98), Ok(2798)),
            (json!(0.1), Ok(10)),
            (json!(1.005), Err(MoneyError::TooPrecise)),
            (json!(5), Ok(500)),
            (json!(-3.5), Ok(-350)),
            (json!("27.98"), Ok(2798)),
            (json!(true), Err(MoneyError::Syntax)),
            (json!(null), Err(MoneyError::Syntax)),
            (json!([1]), Err(MoneyError::Syntax)),
        ];
        for (value, expected) in cases {
            assert_eq!(json_minor_units(&doc(&value), Some("usd")), expected, "{value}");
        }
        // Numbers as they come off the wire, including ones f64 cannot hold
        // exactly: 0.1 + 0.2 style values must still be exact.
        for (text, cents) in [("19.99", 1999), ("0.30", 30), ("1234567.89", 123456789)] {
            let v = Json::parse(text.as_bytes()).unwrap();
            assert_eq!(json_minor_units(&v, None), Ok(cents), "{text}");
        }
        let v = Json::parse(b"1e3").unwrap();
        assert_eq!(json_minor_units(&v, None), Ok(100_000));
        // Past 15 significant digits an f64 no longer holds the sender's
        // text: refused, not silently rounded to a neighbouring amount.
        for text in ["90071992547409.93", "9007199254740993.5", "123456789012345678901.5"] {
            let v = Json::parse(text.as_bytes()).unwrap();
            assert_eq!(json_minor_units(&v, None), Err(MoneyError::Inexact), "{text}");
        }
        let v = Json::parse(b"9999999999999.99").unwrap();
        assert_eq!(
            json_minor_units(&v, None),
            Ok(999_999_999_999_999),
            "15 digits are exact"
        );
        // Integers come through as sent, however long (up to 64 bits).
        let v = Json::parse(b"18446744073709551615").unwrap();
        assert_eq!(json_minor_units(&v, Some("jpy")), Err(MoneyError::Overflow));
    }

    /// Numeric ids past 64 bits are read through a float: two different ids
    /// could come out the same, and the second event be dropped as a
    /// duplicate. They are refused; 64-bit ids and short floats are kept.
    #[test]
    fn numeric_ids_are_kept_only_when_exact() {
        let id = |text: &str| event_id(Some(&Json::parse(text.as_bytes()).unwrap()), "id");
        assert_eq!(id("18446744073709551615"), Ok("18446744073709551615".into()));
        assert_eq!(id("-42"), Ok("-42".into()));
        assert_eq!(id("12.5"), Ok("12.5".into()));
        assert!(id("12345678901234567890123").is_err());
        assert!(id("12345678901234567890124").is_err());
        // Round ones too: both would be 2e19, one significant digit.
        assert!(id("20000000000000000000").is_err());
        assert!(id("20000000000000000001").is_err());
        assert!(id("9007199254740993.0").is_err());
    }

    // -- field paths and errors ---------------------------------------------

    #[test]
    fn field_paths_parse_and_look_up() {
        let p = FieldPath::parse("data.object.id").unwrap();
        assert_eq!(p.to_string(), "data.object.id");
        let v = doc(&json!({"data": {"object": {"id": "x"}, "list": [{"id": 7}], "n": null}}));
        assert_eq!(p.lookup(&v), Some(&doc(&json!("x"))));
        assert_eq!(
            FieldPath::parse("data.list.0.id").unwrap().lookup(&v),
            Some(&doc(&json!(7)))
        );
        assert_eq!(FieldPath::parse("data.list.1.id").unwrap().lookup(&v), None);
        assert_eq!(FieldPath::parse("data.n").unwrap().lookup(&v), None);
        assert_eq!(FieldPath::parse("data.object.id.more").unwrap().lookup(&v), None);
        assert!(FieldPath::parse("").unwrap_err().contains("empty"));
        assert!(FieldPath::parse("a..b").unwrap_err().contains("empty segment"));
        assert!(FieldPath::parse(".a").is_err());
        assert!(FieldPath::parse("a.").is_err());
    }

    #[test]
    fn errors_are_short_and_client_safe() {
        assert_eq!(NormalizeError::MissingId.to_string(), "event id missing");
        assert_eq!(NormalizeError::MissingType.to_string(), "event type missing");
        assert_eq!(NormalizeError::NotJson.to_string(), "body is not valid JSON");
        assert_eq!(NormalizeError::NotObject.to_string(), "body is not a JSON object");
        assert_eq!(bad_money("data.total").to_string(), "invalid amount in data.total");
        assert_eq!(
            bad_field("data.items[0].quantity").to_string(),
            "invalid value in data.items[0].quantity"
        );
    }

    #[test]
    fn envelope_errors() {
        for n in [Normalizer::CrumbPos, Normalizer::Crave, Normalizer::hmac_defaults()] {
            assert_eq!(n.normalize(b"{not json").unwrap_err(), NormalizeError::NotJson);
            assert_eq!(n.normalize(b"").unwrap_err(), NormalizeError::NotJson);
            assert_eq!(n.normalize(b"{} trailing").unwrap_err(), NormalizeError::NotJson);
            assert_eq!(n.normalize(b"\xff\xfe").unwrap_err(), NormalizeError::NotJson);
            for body in [&b"[]"[..], b"\"evt\"", b"42", b"null", b"[{\"id\":\"x\"}]"] {
                assert_eq!(n.normalize(body).unwrap_err(), NormalizeError::NotObject);
            }
            let miss_id = [
                json!({"type": "order.created"}),
                json!({"id": null, "type": "order.created"}),
                json!({"id": "", "type": "order.created"}),
            ];
            for v in miss_id {
                assert_eq!(norm(&n, &v).unwrap_err(), NormalizeError::MissingId, "{v}");
            }
            let miss_type = [
                json!({"id": "evt_1"}),
                json!({"id": "evt_1", "type": ""}),
                json!({"id": "evt_1", "type": null}),
            ];
            for v in miss_type {
                assert_eq!(norm(&n, &v).unwrap_err(), NormalizeError::MissingType, "{v}");
            }
            assert_eq!(
                norm(&n, &json!({"id": {"x": 1}, "type": "t"})).unwrap_err(),
                bad_field("id")
            );
            assert_eq!(norm(&n, &json!({"id": "e", "type": 5})).unwrap_err(), bad_field("type"));
            // Control characters (a NUL first: PostgreSQL cannot store it),
            // and bidirectional ones (an override, an isolate, a mark).
            for id in [
                "evt\u{0}1",
                "evt\n1",
                "\u{7}",
                "evt\u{9b}",
                "evt_\u{202E}1cba",
                "\u{2066}evt\u{2069}",
                "evt\u{200F}",
                "evt\u{061C}",
            ] {
                assert_eq!(
                    norm(&n, &json!({"id": id, "type": "t"})).unwrap_err(),
                    bad_field("id"),
                    "{id:?}"
                );
                assert_eq!(
                    norm(&n, &json!({"id": "e", "type": id})).unwrap_err(),
                    bad_field("type"),
                    "{id:?}"
                );
            }
            // Other text than ASCII is an id like any other.
            let n_ok = norm(&n, &json!({"id": "évt_ü_注文_\u{5D0}", "type": "commande.créée"})).unwrap();
            assert_eq!(
                (n_ok.id.as_str(), n_ok.event_type.as_str()),
                ("évt_ü_注文_\u{5D0}", "commande.créée")
            );
            // Longer than the stores' keys may be: refused, at once.
            let long = "e".repeat(MAX_ID_BYTES + 1);
            assert_eq!(
                norm(&n, &json!({"id": long, "type": "t"})).unwrap_err(),
                bad_field("id")
            );
            assert_eq!(
                norm(&n, &json!({"id": "e", "type": long})).unwrap_err(),
                bad_field("type")
            );
            let longest = "e".repeat(MAX_ID_BYTES);
            assert_eq!(
                norm(&n, &json!({"id": longest, "type": "t"})).unwrap().id.len(),
                MAX_ID_BYTES
            );
            // Beyond ASCII, anything printable is an id.
            assert_eq!(norm(&n, &json!({"id": "évt_ü_1", "type": "t"})).unwrap().id, "évt_ü_1");
            // A numeric id is taken as text.
            let ok = norm(&n, &json!({"id": 12345, "type": "ping"})).unwrap();
            assert_eq!(ok.id, "12345");
            assert_eq!(ok.event_type, "ping");
            assert_eq!(ok.occurred_at, None);
            assert_eq!(ok.views, Views::default());
        }
    }

    #[test]
    fn occurred_at_parses_rfc3339_or_is_none() {
        let n = Normalizer::CrumbPos;
        let at = |v: Value| {
            norm(&n, &json!({"id": "e", "type": "x", "created_at": v}))
                .unwrap()
                .occurred_at
        };
        assert_eq!(at(json!("2024-10-05T14:30:00Z")), ts("2024-10-05T14:30:00Z"));
        assert_eq!(at(json!("2024-10-05T16:30:00+02:00")), ts("2024-10-05T14:30:00Z"));
        assert_eq!(at(json!("2024-10-05T14:30:00.250Z")), ts("2024-10-05T14:30:00.25Z"));
        assert_eq!(at(json!(1_728_138_600)), ts("2024-10-05T14:30:00Z"));
        assert_eq!(at(json!("2024-10-05T14:30:00")), None); // no offset
        assert_eq!(at(json!("yesterday")), None);
        assert_eq!(at(json!("")), None);
        assert_eq!(at(json!(true)), None);
        assert_eq!(at(json!(1.5)), None);
    }

    // -- CrumbPOS -----------------------------------------------------------

    #[test]
    fn crumbpos_order_created_from_the_vendor_doc() {
        let n = Normalizer::CrumbPos.normalize(CRUMB_ORDER.as_bytes()).unwrap();
        assert_eq!(n.id, "evt_abc123");
        assert_eq!(n.event_type, "order.created");
        assert_eq!(n.occurred_at, ts("2024-10-05T14:30:00Z"));
        assert_eq!(n.payload(), serde_json::from_str::<Value>(CRUMB_ORDER).unwrap());
        assert_eq!(n.views.payment, None);
        assert_eq!(n.views.stock, None);
        let expected = Order {
            id: s("ord_xyz789"),
            location_id: s("loc_main"),
            status: s("open"),
            channel: s("pos"),
            total_cents: Some(4250),
            tax_cents: Some(340),
            tip_cents: None,
            currency: None,
            customer: None,
            items: vec![Item {
                name: s("Burger Deluxe"),
                quantity: 2,
                unit_price_cents: Some(1500),
                total_cents: Some(3000),
                modifiers: vec![Modifier {
                    id: s("mod_no_onions"),
                    name: s("No Onions"),
                    price_cents: Some(0),
                }],
            }],
        };
        assert_eq!(n.views.order, Some(expected));
    }

    #[test]
    fn crumbpos_payment_completed_from_the_vendor_doc() {
        let n = Normalizer::CrumbPos.normalize(CRUMB_PAYMENT.as_bytes()).unwrap();
        assert_eq!(n.id, "evt_def456");
        assert_eq!(n.event_type, "payment.completed");
        assert_eq!(n.occurred_at, ts("2024-10-05T14:32:00Z"));
        assert_eq!(n.views.order, None);
        assert_eq!(n.views.stock, None);
        assert_eq!(
            n.views.payment,
            Some(Payment {
                id: s("pay_ghi789"),
                order_id: s("ord_xyz789"),
                amount_cents: Some(4250),
                tip_cents: Some(850),
                method: s("card"),
                card_brand: s("visa"),
                card_last_four: s("4242"),
                status: s("completed"),
            })
        );
    }

    #[test]
    fn crumbpos_order_with_customer_tip_currency_and_priced_modifiers() {
        let v = json!({
            "id": "evt_1", "type": "order.updated", "created_at": "2024-10-05T14:35:00Z",
            "data": {"id": "ord_1", "type": "order", "attributes": {
                "status": "closed", "source": "delivery", "total": 5120, "tax": 320,
                "tip": 500, "currency": "USD", "location_id": "loc_2",
                "customer_id": "cus_9", "customer_name": "Sam Lee",
                "customer_email": "sam@example.com",
                "items": [
                    {"name": "Fries", "quantity": 3, "price": 400,
                     "modifiers": [
                        {"id": "m1", "name": "Cheese", "price": 150},
                        {"id": "m2", "name": "Extra salt"},
                        "Well done"
                     ]},
                    {"name": "Soda", "price": 250},
                    {"name": "Mystery", "quantity": 1}
                ]
            }}
        });
        let o = norm(&Normalizer::CrumbPos, &v).unwrap().views.order.unwrap();
        assert_eq!(o.status, s("closed"));
        assert_eq!(o.channel, s("delivery"));
        assert_eq!(o.tip_cents, Some(500));
        assert_eq!(o.currency, s("usd"));
        assert_eq!(
            o.customer,
            Some(Customer {
                id: s("cus_9"),
                name: s("Sam Lee"),
                email: s("sam@example.com")
            })
        );
        assert_eq!(o.items.len(), 3);
        assert_eq!(o.items[0].total_cents, Some((400 + 150) * 3));
        assert_eq!(o.items[0].unit_price_cents, Some(400));
        assert_eq!(o.items[0].modifiers[1].price_cents, None);
        assert_eq!(
            o.items[0].modifiers[2],
            Modifier {
                id: None,
                name: s("Well done"),
                price_cents: None
            }
        );
        assert_eq!(o.items[1].quantity, 1, "absent quantity is 1");
        assert_eq!(o.items[1].total_cents, Some(250));
        assert_eq!(o.items[2].unit_price_cents, None);
        assert_eq!(o.items[2].total_cents, None);
    }

    #[test]
    fn crumbpos_nested_customer_wins_over_flat_fields() {
        let v = json!({"id": "e", "type": "order.created", "data": {"id": "o", "type": "order",
            "attributes": {"customer": {"id": 77, "name": "Nested"},
                           "customer_name": "Flat", "customer_email": "flat@example.com"}}});
        let o = norm(&Normalizer::CrumbPos, &v).unwrap().views.order.unwrap();
        assert_eq!(
            o.customer,
            Some(Customer {
                id: s("77"),
                name: s("Nested"),
                email: s("flat@example.com")
            })
        );
        assert_eq!(o.items, vec![]);
    }

    #[test]
    fn crumbpos_inventory_low_stock() {
        let v = json!({"id": "evt_9", "type": "inventory.low_stock",
            "created_at": "2024-10-05T15:00:00Z",
            "data": {"id": "inv_1", "type": "inventory_item", "attributes": {
                "menu_item_id": "mi_burger", "name": "Burger buns", "location_id": "loc_main",
                "location_name": "Main St", "quantity": 12, "reorder_point": 20}}});
        let n = norm(&Normalizer::CrumbPos, &v).unwrap();
        assert_eq!(n.views.order, None);
        assert_eq!(n.views.payment, None);
        assert_eq!(
            n.views.stock,
            Some(Stock {
                item_id: s("mi_burger"),
                name: s("Burger buns"),
                location_id: s("loc_main"),
                quantity: Some(12),
                reorder_point: Some(20),
            })
        );
        // item_id wins over menu_item_id; data.id is the fallback.
        let mut v2 = v.clone();
        v2["data"]["attributes"]["item_id"] = json!("it_5");
        let st = norm(&Normalizer::CrumbPos, &v2).unwrap().views.stock.unwrap();
        assert_eq!(st.item_id, s("it_5"));
        let mut v3 = v.clone();
        v3["data"]["attributes"].as_object_mut().unwrap().remove("menu_item_id");
        v3["data"]["attributes"]["quantity"] = json!(2.5);
        let st = norm(&Normalizer::CrumbPos, &v3).unwrap().views.stock.unwrap();
        assert_eq!(st.item_id, s("inv_1"));
        assert_eq!(st.quantity, None, "fractional stock is not an error");
        let mut v4 = v.clone();
        v4["data"]["attributes"]["quantity"] = json!("lots");
        assert_eq!(
            norm(&Normalizer::CrumbPos, &v4).unwrap_err(),
            bad_field("data.attributes.quantity")
        );
    }

    #[test]
    fn crumbpos_amounts_must_be_integers() {
        let base = |field: &str, value: Value| {
            let mut v = serde_json::from_str::<Value>(CRUMB_ORDER).unwrap();
            v["data"]["attributes"][field] = value;
            norm(&Normalizer::CrumbPos, &v)
        };
        assert_eq!(
            base("total", json!(42.5)).unwrap_err(),
            bad_money("data.attributes.total")
        );
        assert_eq!(
            base("total", json!("4250")).unwrap_err(),
            bad_money("data.attributes.total")
        );
        assert_eq!(base("tax", json!(true)).unwrap_err(), bad_money("data.attributes.tax"));
        assert_eq!(
            base("total", json!(u64::MAX)).unwrap_err(),
            bad_money("data.attributes.total")
        );
        // An integral number written with a fraction is still exact.
        let o = base("total", json!(4250.0)).unwrap().views.order.unwrap();
        assert_eq!(o.total_cents, Some(4250));
        let o = base("total", json!(null)).unwrap().views.order.unwrap();
        assert_eq!(o.total_cents, None);

        let mut v = serde_json::from_str::<Value>(CRUMB_ORDER).unwrap();
        v["data"]["attributes"]["items"][0]["modifiers"][0]["price"] = json!(0.5);
        assert_eq!(
            norm(&Normalizer::CrumbPos, &v).unwrap_err(),
            bad_money("data.attributes.items[0].modifiers[0].price")
        );
        let mut v = serde_json::from_str::<Value>(CRUMB_ORDER).unwrap();
        v["data"]["attributes"]["items"][0]["price"] = json!(i64::MAX);
        assert_eq!(
            norm(&Normalizer::CrumbPos, &v).unwrap_err(),
            bad_money("data.attributes.items[0].price")
        );
        let mut v = serde_json::from_str::<Value>(CRUMB_PAYMENT).unwrap();
        v["data"]["attributes"]["amount"] = json!("42.50");
        assert_eq!(
            norm(&Normalizer::CrumbPos, &v).unwrap_err(),
            bad_money("data.attributes.amount")
        );
    }

    #[test]
    fn crumbpos_wrong_shapes_are_bad_fields() {
        let with = |f: &dyn Fn(&mut Value)| {
            let mut v = serde_json::from_str::<Value>(CRUMB_ORDER).unwrap();
            f(&mut v);
            norm(&Normalizer::CrumbPos, &v)
        };
        assert_eq!(with(&|v| v["data"] = json!("x")).unwrap_err(), bad_field("data"));
        assert_eq!(
            with(&|v| v["data"]["attributes"] = json!([1])).unwrap_err(),
            bad_field("data.attributes")
        );
        assert_eq!(
            with(&|v| v["data"]["attributes"]["items"] = json!({})).unwrap_err(),
            bad_field("data.attributes.items")
        );
        assert_eq!(
            with(&|v| v["data"]["attributes"]["items"][0] = json!(5)).unwrap_err(),
            bad_field("data.attributes.items[0]")
        );
        assert_eq!(
            with(&|v| v["data"]["attributes"]["items"][0]["quantity"] = json!(1.5)).unwrap_err(),
            bad_field("data.attributes.items[0].quantity")
        );
        assert_eq!(
            with(&|v| v["data"]["attributes"]["status"] = json!({"a": 1})).unwrap_err(),
            bad_field("data.attributes.status")
        );
        // No data at all: the event is accepted, without views.
        let n = with(&|v| {
            v.as_object_mut().unwrap().remove("data");
        })
        .unwrap();
        assert_eq!(n.views, Views::default());
        // No attributes: an order view with only the id.
        let o = with(&|v| {
            v["data"].as_object_mut().unwrap().remove("attributes");
        })
        .unwrap()
        .views
        .order
        .unwrap();
        assert_eq!(
            o,
            Order {
                id: s("ord_xyz789"),
                ..Order::default()
            }
        );
    }

    #[test]
    fn crumbpos_views_follow_data_type_or_event_type() {
        let n = norm(
            &Normalizer::CrumbPos,
            &json!({"id": "e", "type": "order.voided", "data": {"id": "o1"}}),
        )
        .unwrap();
        assert!(n.views.order.is_some());
        let n = norm(
            &Normalizer::CrumbPos,
            &json!({"id": "e", "type": "something.else", "data": {"id": "p1", "type": "payment"}}),
        )
        .unwrap();
        assert!(n.views.payment.is_some() && n.views.order.is_none());
        let n = norm(
            &Normalizer::CrumbPos,
            &json!({"id": "e", "type": "menu.updated", "data": {"id": "m", "type": "menu"}}),
        )
        .unwrap();
        assert_eq!(n.views, Views::default());
    }

    // -- Crave --------------------------------------------------------------

    #[test]
    fn crave_order_created_from_the_vendor_doc() {
        let n = Normalizer::Crave.normalize(CRAVE_ORDER.as_bytes()).unwrap();
        assert_eq!(n.id, "evt_abc123");
        assert_eq!(n.event_type, "order.created");
        assert_eq!(n.occurred_at, ts("2025-03-15T18:30:00Z"));
        assert_eq!(n.payload(), serde_json::from_str::<Value>(CRAVE_ORDER).unwrap());
        assert_eq!(n.views.payment, None);
        assert_eq!(n.views.stock, None);
        let expected = Order {
            id: s("ord_456"),
            location_id: s("loc_123"),
            status: s("created"),
            channel: s("delivery"),
            total_cents: Some(2798),
            tax_cents: None,
            tip_cents: None,
            currency: s("usd"),
            customer: Some(Customer {
                id: None,
                name: s("Alex Johnson"),
                email: s("alex@example.com"),
            }),
            items: vec![Item {
                name: s("Margherita Pizza"),
                quantity: 2,
                unit_price_cents: Some(1299),
                total_cents: Some(2598),
                modifiers: vec![],
            }],
        };
        assert_eq!(n.views.order, Some(expected));
    }

    #[test]
    fn crave_status_follows_the_event_type() {
        let mut v = serde_json::from_str::<Value>(CRAVE_ORDER).unwrap();
        for status in ["created", "confirmed", "ready", "completed", "cancelled"] {
            v["type"] = json!(format!("order.{status}"));
            let o = norm(&Normalizer::Crave, &v).unwrap().views.order.unwrap();
            assert_eq!(o.status, s(status));
            assert_eq!(o.id, s("ord_456"));
        }
        v["type"] = json!("location.updated");
        assert_eq!(norm(&Normalizer::Crave, &v).unwrap().views, Views::default());
    }

    #[test]
    fn crave_cart_abandoned() {
        let v = json!({"id": "evt_c1", "type": "cart.abandoned", "createdAt": "2025-03-15T19:00:00Z",
            "data": {"cartId": "cart_789", "locationId": "loc_123", "total": "12.50",
                     "currency": "usd", "items": [{"name": "Salad", "quantity": 1, "total": "12.50"}]}});
        let o = norm(&Normalizer::Crave, &v).unwrap().views.order.unwrap();
        assert_eq!(o.id, None);
        assert_eq!(o.status, s("abandoned"));
        assert_eq!(o.total_cents, Some(1250));
        assert_eq!(o.customer, None);
        assert_eq!(o.items[0].unit_price_cents, Some(1250));
        let mut v2 = v.clone();
        v2["data"]["orderId"] = json!("ord_1");
        let o = norm(&Normalizer::Crave, &v2).unwrap().views.order.unwrap();
        assert_eq!(o.id, s("ord_1"));
    }

    #[test]
    fn crave_items_prices_modifiers_tax_tip() {
        let v = json!({"id": "e", "type": "order.completed", "data": {
        "orderId": "o", "customerId": "cus_1", "total": "31.00", "tax": "2.25", "tip": 3,
        "currency": "USD",
        "items": [
            {"name": "Wings", "quantity": 3, "total": "10.00"},
            {"name": "Pie", "quantity": 2, "total": "9.00", "price": "4.50"},
            {"name": "Cake", "quantity": 2, "total": "8.00", "unitPrice": 4,
             "modifiers": [{"id": "m1", "name": "Cream", "price": "0.50"}, {"name": "Candle"}]},
            {"name": "Zero", "quantity": 0, "total": "0.00"},
            {"name": "Loose"}
        ]}});
        let o = norm(&Normalizer::Crave, &v).unwrap().views.order.unwrap();
        assert_eq!(o.total_cents, Some(3100));
        assert_eq!(o.tax_cents, Some(225));
        assert_eq!(o.tip_cents, Some(300));
        assert_eq!(o.currency, s("usd"));
        assert_eq!(
            o.customer,
            Some(Customer {
                id: s("cus_1"),
                name: None,
                email: None
            })
        );
        assert_eq!(o.items[0].unit_price_cents, None, "1000 / 3 is not exact");
        assert_eq!(o.items[1].unit_price_cents, Some(450));
        assert_eq!(o.items[2].unit_price_cents, Some(400));
        assert_eq!(
            o.items[2].modifiers,
            vec![
                Modifier {
                    id: s("m1"),
                    name: s("Cream"),
                    price_cents: Some(50)
                },
                Modifier {
                    id: None,
                    name: s("Candle"),
                    price_cents: None
                },
            ]
        );
        assert_eq!(o.items[3].unit_price_cents, None);
        assert_eq!(o.items[4].quantity, 1);
        assert_eq!(o.items[4].total_cents, None);
    }

    #[test]
    fn crave_money_uses_the_currency() {
        let v = json!({"id": "e", "type": "order.created", "data": {
            "total": "1500", "currency": "jpy", "items": [{"name": "Ramen", "quantity": 2, "total": 1500}]}});
        let o = norm(&Normalizer::Crave, &v).unwrap().views.order.unwrap();
        assert_eq!(o.total_cents, Some(1500));
        assert_eq!(o.items[0].unit_price_cents, Some(750));
        let v = json!({"id": "e", "type": "order.created", "data": {"total": "12.345", "currency": "KWD"}});
        let o = norm(&Normalizer::Crave, &v).unwrap().views.order.unwrap();
        assert_eq!(o.total_cents, Some(12345));
        // No currency: two decimals.
        let v = json!({"id": "e", "type": "order.created", "data": {"total": "12.34"}});
        let o = norm(&Normalizer::Crave, &v).unwrap().views.order.unwrap();
        assert_eq!((o.total_cents, o.currency), (Some(1234), None));
    }

    #[test]
    fn crave_bad_money_is_reported_with_its_path() {
        let with = |f: &dyn Fn(&mut Value)| {
            let mut v = serde_json::from_str::<Value>(CRAVE_ORDER).unwrap();
            f(&mut v);
            norm(&Normalizer::Crave, &v)
        };
        let err = with(&|v| v["data"]["total"] = json!("abc")).unwrap_err();
        assert_eq!(err, bad_money("data.total"));
        assert_eq!(err.to_string(), "invalid amount in data.total");
        assert!(!err.to_string().contains("abc"));
        for bad in [json!("27.985"), json!("1,000.00"), json!(""), json!(true), json!({})] {
            assert_eq!(
                with(&|v| v["data"]["total"] = bad.clone()).unwrap_err(),
                bad_money("data.total")
            );
        }
        assert_eq!(
            with(&|v| v["data"]["items"][0]["total"] = json!("25.9.8")).unwrap_err(),
            bad_money("data.items[0].total")
        );
        assert_eq!(
            with(&|v| v["data"]["currency"] = json!(["usd"])).unwrap_err(),
            bad_field("data.currency")
        );
        // Amounts written as JSON numbers are fine.
        let o = with(&|v| v["data"]["total"] = json!(27.98))
            .unwrap()
            .views
            .order
            .unwrap();
        assert_eq!(o.total_cents, Some(2798));
    }

    // -- hmac kind ----------------------------------------------------------

    #[test]
    fn hmac_kind_reads_configured_fields_and_has_no_views() {
        let n = Normalizer::Hmac {
            id_field: FieldPath::parse("meta.event_id").unwrap(),
            type_field: FieldPath::parse("meta.kind").unwrap(),
            time_field: Some(FieldPath::parse("meta.at").unwrap()),
        };
        let v = json!({"meta": {"event_id": 991, "kind": "order.created", "at": "2025-01-01T00:00:00Z"},
                       "data": {"orderId": "x", "total": "abc"}});
        let out = norm(&n, &v).unwrap();
        assert_eq!(out.id, "991");
        assert_eq!(out.event_type, "order.created");
        assert_eq!(out.occurred_at, ts("2025-01-01T00:00:00Z"));
        assert_eq!(out.views, Views::default());
        assert_eq!(out.payload(), v);
        let err = norm(&n, &json!({"meta": {"event_id": "", "kind": "x"}})).unwrap_err();
        assert_eq!(err, NormalizeError::MissingId);
        let err = norm(&n, &json!({"meta": {"event_id": "1"}})).unwrap_err();
        assert_eq!(err, NormalizeError::MissingType);
        let err = norm(&n, &json!({"meta": {"event_id": [1], "kind": "x"}})).unwrap_err();
        assert_eq!(err, bad_field("meta.event_id"));
        // No time field configured.
        let n = Normalizer::Hmac {
            id_field: FieldPath::parse("id").unwrap(),
            type_field: FieldPath::parse("type").unwrap(),
            time_field: None,
        };
        let out = norm(
            &n,
            &json!({"id": "a", "type": "b", "created_at": "2025-01-01T00:00:00Z"}),
        )
        .unwrap();
        assert_eq!(out.occurred_at, None);
    }
}
