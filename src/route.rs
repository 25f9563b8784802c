//! Routing: which sinks an event goes to.
//!
//! Routes are evaluated at ingest, before the event is stored, so the event
//! and its deliveries are committed together. Several routes may choose the
//! same sink: it gets the event once.

use std::sync::Arc;

use expeditor_api::{TemplateId, Templates};
use minijinja::Value;

/// An event type pattern: exact, or with `*` (any run of characters) and `?`
/// (one character). `order.*` matches `order.created` but not `payment.completed`.
#[derive(Debug, Clone)]
pub struct Glob(String);

impl Glob {
    pub fn new(pattern: &str) -> Result<Self, String> {
        if pattern.trim().is_empty() {
            return Err("an empty event pattern matches nothing; remove it or write \"*\"".into());
        }
        Ok(Self(pattern.to_string()))
    }

    pub fn matches(&self, text: &str) -> bool {
        glob_match(self.0.as_bytes(), text.as_bytes())
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Iterative wildcard match with single-star backtracking: linear in practice,
/// no recursion, so no pattern can blow the stack. A `*` in the pattern is
/// always the wildcard (even where the text has a `*` too), and `?` takes
/// one character, however many bytes it is.
fn glob_match(p: &[u8], t: &[u8]) -> bool {
    // Text positions stay on character boundaries: a literal byte match
    // walks a character's bytes in step with the pattern's own.
    let char_len = |at: usize| {
        match t[at] {
            0xF0.. => 4,
            0xE0.. => 3,
            0xC0.. => 2,
            _ => 1,
        }
        .min(t.len() - at)
    };
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == b'?' {
            pi += 1;
            ti += char_len(ti);
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            let next = st + char_len(st);
            pi = sp + 1;
            ti = next;
            star = Some((sp, next));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[derive(Debug)]
pub struct Route {
    pub name: String,
    /// `None`: every source.
    pub sources: Option<Vec<String>>,
    /// `None`: every event type.
    pub events: Option<Vec<Glob>>,
    pub when: Option<TemplateId>,
    pub sinks: Vec<String>,
}

/// What routing decided for one event.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// Distinct sinks, in the order routes named them.
    pub sinks: Vec<String>,
    /// Routes whose `when` failed to evaluate (route name, error).
    pub when_errors: Vec<(String, String)>,
    /// The sinks of those routes that no other route chose, each with why:
    /// they get a dead letter, so the event is there to replay to them once
    /// the `when` is fixed (`replay --dead-letters`), not only in the store.
    pub undecided: Vec<(String, String)>,
}

#[derive(Debug)]
pub struct Router {
    routes: Vec<Route>,
    templates: Arc<Templates>,
}

impl Router {
    pub fn new(routes: Vec<Route>, templates: Arc<Templates>) -> Self {
        Self { routes, templates }
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The context the `when` expressions need: only the parts of the event
    /// they read (`event.type == "..."` needs no payload converted).
    pub fn context(&self, event: &std::sync::Arc<expeditor_api::Event>) -> Value {
        self.templates.context_for(event)
    }

    /// What the `when` expressions read of an event.
    pub fn reads(&self) -> expeditor_api::Reads {
        self.templates.reads()
    }

    /// Routes an event. `context` builds the template context, and is called
    /// only if a route with a `when` matched on source and type (it costs a
    /// conversion of the payload).
    pub fn route(&self, source: &str, event_type: &str, context: impl FnOnce() -> Value) -> Decision {
        let mut decision = Decision::default();
        let mut context = Some(context);
        let mut ctx: Option<Value> = None;
        for route in &self.routes {
            if let Some(sources) = &route.sources
                && !sources.iter().any(|s| s == source)
            {
                continue;
            }
            if let Some(events) = &route.events
                && !events.iter().any(|g| g.matches(event_type))
            {
                continue;
            }
            if route.sinks.iter().all(|s| decision.sinks.contains(s)) {
                continue;
            }
            if let Some(when) = &route.when {
                let ctx = ctx.get_or_insert_with(|| (context.take().expect("context built once"))());
                match self.templates.is_true(when, ctx) {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(e) => {
                        let why = format!("route {:?} could not decide: {}", route.name, e.message);
                        for sink in &route.sinks {
                            if !decision.undecided.iter().any(|(s, _)| s == sink) {
                                decision.undecided.push((sink.clone(), why.clone()));
                            }
                        }
                        decision.when_errors.push((route.name.clone(), e.message));
                        continue;
                    }
                }
            }
            for sink in &route.sinks {
                if !decision.sinks.contains(sink) {
                    decision.sinks.push(sink.clone());
                }
            }
        }
        // Another route took it: delivered as usual.
        decision.undecided.retain(|(sink, _)| !decision.sinks.contains(sink));
        decision
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use expeditor_api::TemplateSet;
    use minijinja::context;

    #[test]
    fn globs() {
        let g = |p: &str, t: &str| Glob::new(p).unwrap().matches(t);
        assert!(g("order.*", "order.created"));
        assert!(!g("order.*", "payment.completed"));
        assert!(g("*", "anything"));
        assert!(g("order.created", "order.created"));
        assert!(!g("order.created", "order.created2"));
        assert!(g("*.low_stock", "inventory.low_stock"));
        assert!(g("order.?????", "order.ready"));
        assert!(!g("order.?????", "order.created"));
        assert!(g("a*b*c", "axxbyyc"));
        assert!(!g("a*b*c", "axxbyy"));
        assert!(Glob::new(" ").is_err());
        // A `*` in the text does not stop the pattern's from being a wildcard.
        assert!(g("*", "*x"));
        assert!(g("a*", "a*b"));
        assert!(g("*.ready", "*.x.ready"));
        // `?` is one character, not one byte.
        assert!(g("order.?", "order.\u{e9}"));
        assert!(g("?\u{e9}?", "\u{1f600}\u{e9}z"));
        assert!(!g("?", "\u{e9}\u{e9}"));
        assert!(g("*\u{e9}", "\u{e0}\u{e9}"));
        assert!(!g("*\u{e9}", "\u{e9}a"));
    }

    /// (name, sources, events, when, sinks)
    type RouteSpec<'a> = (
        &'a str,
        Option<&'a [&'a str]>,
        Option<&'a [&'a str]>,
        Option<&'a str>,
        &'a [&'a str],
    );

    fn router(routes: Vec<RouteSpec<'_>>) -> Router {
        let mut set = TemplateSet::new();
        let routes = routes
            .into_iter()
            .enumerate()
            .map(|(i, (name, sources, events, when, sinks))| Route {
                name: name.into(),
                sources: sources.map(|s| s.iter().map(|x| x.to_string()).collect()),
                events: events.map(|e| e.iter().map(|x| Glob::new(x).unwrap()).collect()),
                when: when.map(|w| set.expression(&format!("routes[{i}].when"), w).unwrap()),
                sinks: sinks.iter().map(|x| x.to_string()).collect(),
            })
            .collect();
        Router::new(routes, set.finish())
    }

    #[test]
    fn routes_by_source_type_and_when_and_dedupes_sinks() {
        let r = router(vec![
            (
                "kitchen",
                Some(&["crumb", "crave"]),
                Some(&["order.created"]),
                None,
                &["kds"],
            ),
            (
                "big",
                None,
                Some(&["order.*"]),
                Some("order.total_cents > 3000"),
                &["slack", "kds"],
            ),
            ("all", Some(&["crave"]), None, None, &["warehouse"]),
        ]);
        let big = || context! { order => context! { total_cents => 4250 } };
        let small = || context! { order => context! { total_cents => 2798 } };
        assert_eq!(r.route("crumb", "order.created", big).sinks, vec!["kds", "slack"]);
        assert_eq!(r.route("crumb", "order.created", small).sinks, vec!["kds"]);
        assert_eq!(r.route("crave", "order.ready", small).sinks, vec!["warehouse"]);
        assert_eq!(r.route("crumb", "payment.completed", big).sinks, Vec::<String>::new());
    }

    /// The router's context holds what its `when`s read, and routes the same
    /// as the whole context would.
    #[test]
    fn context_holds_what_the_whens_read() {
        let event = std::sync::Arc::new(expeditor_api::Event {
            event: expeditor_api::EventMeta {
                id: "evt_1".into(),
                source: "crave".into(),
                kind: "crave".into(),
                event_type: "order.created".into(),
                occurred_at: None,
                received_at: "2026-12-02T10:00:00Z".into(),
            },
            payload: serde_json::json!({"data": {"channel": "pickup"}}),
            views: expeditor_api::Views {
                order: Some(expeditor_api::Order {
                    total_cents: Some(4250),
                    ..Default::default()
                }),
                ..Default::default()
            },
        });
        let cheap = router(vec![
            ("src", None, None, Some("event.source == 'crave'"), &["a"]),
            ("pickup", None, None, Some("payload.data.channel == 'pickup'"), &["b"]),
            ("other", None, None, Some("payload.data.channel == 'delivery'"), &["c"]),
        ]);
        let ctx = cheap.context(&event);
        assert!(
            ctx.get_attr("order").unwrap().is_undefined(),
            "views converted for nothing"
        );
        assert_eq!(
            cheap.route("crave", "order.created", || ctx.clone()).sinks,
            vec!["a", "b"]
        );
        let views = router(vec![("big", None, None, Some("order.total_cents > 3000"), &["d"])]);
        assert_eq!(
            views.route("crave", "order.created", || views.context(&event)).sinks,
            vec!["d"]
        );
    }

    #[test]
    fn context_is_only_built_when_needed() {
        let r = router(vec![("a", None, None, None, &["x"])]);
        let d = r.route("s", "t", || panic!("no when, no context"));
        assert_eq!(d.sinks, vec!["x"]);
    }

    #[test]
    fn when_errors_are_reported_not_routed() {
        let r = router(vec![("bad", None, None, Some("order.total_cents > 'x' + 1"), &["x"])]);
        let d = r.route("s", "t", || context! { order => context! { total_cents => 1 } });
        assert!(d.sinks.is_empty());
        assert_eq!(d.when_errors.len(), 1);
        assert_eq!(d.when_errors[0].0, "bad");
        assert_eq!(d.undecided.len(), 1);
        assert_eq!(d.undecided[0].0, "x");
        assert!(
            d.undecided[0].1.starts_with("route \"bad\" could not decide: "),
            "{:?}",
            d.undecided
        );

        // A sink another route takes is delivered as usual; the rest of the
        // failing route's sinks are undecided.
        let r = router(vec![
            ("bad", None, None, Some("order.total_cents > 'x' + 1"), &["x", "y"]),
            ("good", None, None, None, &["y"]),
        ]);
        let d = r.route("s", "t", || context! { order => context! { total_cents => 1 } });
        assert_eq!(d.sinks, vec!["y"]);
        assert_eq!(d.undecided.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>(), ["x"]);

        // A missing field compared or tested is false, not an error.
        let r = router(vec![
            ("big", None, None, Some("order.total_cents > 0"), &["x"]),
            ("known", None, None, Some("order.customer.id"), &["y"]),
        ]);
        let d = r.route("s", "t", || context! { order => context! { id => "o1" } });
        assert!(d.sinks.is_empty() && d.when_errors.is_empty(), "{d:?}");
    }
}
