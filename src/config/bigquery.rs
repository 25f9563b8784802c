//! `type = "bigquery"` sinks: `project`, `dataset`, `table`, a `[sinks.X.row]`
//! template, `batch = { max_rows, max_bytes, linger }` within BigQuery's
//! limits, and a way to authenticate that `check` can see (the rule is in
//! `expeditor_bigquery::check_auth`).

use std::path::Path;

use expeditor_api::TemplateSet;
use expeditor_bigquery::{
    Auth, BigQuerySinkConfig, DEFAULT_MAX_BYTES, DEFAULT_MAX_ROWS, MAX_BYTES_LIMIT, MAX_ROWS_LIMIT,
};
use toml::Spanned;
use toml::de::DeValue;

use super::raw::{RawBigQuerySink, Str};
use super::{Cx, SinkKind, SinkSpec};

/// Smallest `batch.max_bytes`: a request must hold at least one real row.
const MIN_MAX_BYTES: usize = 1024;

impl Cx<'_> {
    pub(super) fn bigquery_sink(
        &mut self,
        name: &str,
        key: &str,
        value: &Spanned<DeValue<'_>>,
        base: &Path,
    ) -> Option<SinkSpec> {
        let r: RawBigQuerySink = self.typed(value, key)?;
        let common = sink_common!(self, key, r);

        let project = self.bigquery_id(&r.project, &format!("{key}.project"), expeditor_bigquery::check_project);
        let dataset = self.bigquery_id(&r.dataset, &format!("{key}.dataset"), expeditor_bigquery::check_dataset);
        let table = self.bigquery_id(&r.table, &format!("{key}.table"), expeditor_bigquery::check_table);

        let bkey = format!("{key}.batch");
        let b = r.batch.as_ref().map(Spanned::get_ref);
        let max_rows = self.int(
            b.and_then(|b| b.max_rows.as_ref()),
            &format!("{bkey}.max_rows"),
            DEFAULT_MAX_ROWS as i64,
            1..MAX_ROWS_LIMIT as i64 + 1,
        );
        let max_bytes = self.size(
            b.and_then(|b| b.max_bytes.as_ref()),
            &format!("{bkey}.max_bytes"),
            DEFAULT_MAX_BYTES,
        );
        let max_bytes = match (max_bytes, b.and_then(|b| b.max_bytes.as_ref())) {
            (Some(n), Some(s)) if !(MIN_MAX_BYTES..=MAX_BYTES_LIMIT).contains(&n) => {
                self.error_at(
                    s.span(),
                    &format!("{bkey}.max_bytes"),
                    "must be between 1KiB and 10MiB: BigQuery refuses a request over 10 MB",
                );
                None
            }
            (n, _) => n,
        };
        let linger = self.linger(b.and_then(|b| b.linger.as_ref()), &format!("{bkey}.linger"));

        let ekey = format!("{key}.endpoint");
        let endpoint = match &r.endpoint {
            Some(e) => match self.resolve(e, &ekey).map(|v| expeditor_bigquery::check_endpoint(&v)) {
                Some(Ok(url)) => Some(Some(url)),
                Some(Err(msg)) => {
                    self.error_at(e.span(), &ekey, msg);
                    None
                }
                None => None,
            },
            None => Some(None),
        };
        let auth = self.bigquery_auth(key, &r, base);
        if let (Some(auth), Some(endpoint)) = (&auth, &endpoint) {
            let env = self.env;
            if let Err(msg) = expeditor_bigquery::check_auth(auth, endpoint.as_deref(), env, &|p| std::fs::read(p)) {
                let (span, at) = match (auth, &r.credentials, &r.auth) {
                    (Auth::File(_), Some(c), _) => (c.span(), format!("{key}.credentials")),
                    (Auth::None, _, Some(a)) => (a.span(), format!("{key}.auth")),
                    _ => (value.span(), key.to_owned()),
                };
                self.error_at(span, &at, msg);
            }
        }

        let rkey = format!("{key}.row");
        let mut set = TemplateSet::new();
        let row = match value.get_ref() {
            DeValue::Table(t) => t.get("row"),
            _ => None,
        };
        let row = match row {
            Some(row) if matches!(row.get_ref(), DeValue::Table(_)) => self.structured(&mut set, &rkey, row),
            Some(row) => {
                self.error_at(
                    row.span(),
                    &rkey,
                    "must be a table of column = value, e.g. [sinks.NAME.row] order_id = \"{{ order.id }}\"",
                );
                None
            }
            None => {
                self.error_at(
                    value.span(),
                    &rkey,
                    "is required: a table of column = value, e.g. [sinks.NAME.row] order_id = \"{{ order.id }}\"",
                );
                None
            }
        };

        let common = common?;
        Some(SinkSpec {
            name: name.to_string(),
            common,
            kind: SinkKind::BigQuery(BigQuerySinkConfig {
                name: name.to_string(),
                project: project?,
                dataset: dataset?,
                table: table?,
                row: row?,
                templates: set.finish(),
                max_rows: max_rows? as usize,
                max_bytes: max_bytes?,
                linger: linger?,
                endpoint: endpoint?,
                auth: auth?,
                timeout: common.timeout,
                skip_invalid_rows: true,
            }),
        })
    }

    fn bigquery_id(&mut self, s: &Str, key: &str, check: fn(&str) -> Result<(), String>) -> Option<String> {
        let v = self.resolve(s, key)?;
        match check(&v) {
            Ok(()) => Some(v),
            Err(msg) => {
                self.error_at(s.span(), key, msg);
                None
            }
        }
    }

    fn bigquery_auth(&mut self, key: &str, r: &RawBigQuerySink, base: &Path) -> Option<Auth> {
        let akey = format!("{key}.auth");
        let mode = match &r.auth {
            Some(a) => match self.resolve(a, &akey)?.trim() {
                "application-default" => "application-default",
                "none" => "none",
                other => {
                    self.error_at(
                        a.span(),
                        &akey,
                        format!("unknown auth {other:?}; expected \"application-default\" or \"none\""),
                    );
                    return None;
                }
            },
            None => "application-default",
        };
        match (mode, &r.credentials) {
            ("none", Some(c)) => {
                self.error_at(
                    c.span(),
                    &format!("{key}.credentials"),
                    "is not used with auth = \"none\"; remove one of them",
                );
                None
            }
            ("none", None) => Some(Auth::None),
            (_, Some(c)) => {
                let ckey = format!("{key}.credentials");
                let path = self.resolve(c, &ckey)?;
                if path.trim().is_empty() {
                    self.error_at(c.span(), &ckey, "is empty");
                    return None;
                }
                Some(Auth::File(base.join(path.trim())))
            }
            (_, None) => Some(Auth::ApplicationDefault),
        }
    }
}
