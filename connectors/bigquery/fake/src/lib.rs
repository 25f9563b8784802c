//! A BigQuery stand-in for the `bigquery` sink's tests: the `tabledata.insertAll`
//! REST endpoint against a declared table schema, Google's OAuth 2.0 token
//! endpoint for service accounts, and the GCE metadata server's token
//! endpoint, on one `127.0.0.1` port.
//!
//! It follows what BigQuery documents and answers (and what
//! `../shared/notes/crates.md` records):
//! - `POST /bigquery/v2/projects/{p}/datasets/{d}/tables/{t}/insertAll`, a
//!   JSON body `{"rows": [{"insertId", "json"}], "skipInvalidRows", ...}`;
//!   an unknown table is a 404 `notFound` in Google's error shape.
//! - Each row is checked against the schema (unknown fields, missing
//!   `REQUIRED` fields, values that do not convert to the column type,
//!   arrays for non-repeated fields, records). A bad row gets HTTP 200 with
//!   `insertErrors: [{index, errors: [{reason: "invalid", location,
//!   debugInfo, message}]}]`. With `skipInvalidRows: false` (BigQuery's
//!   default) nothing of that request is inserted and every other row gets
//!   reason `stopped`; with `true` the good rows are inserted.
//! - `insertId` dedupe: a row whose id was inserted before is dropped, and the
//!   request still succeeds (BigQuery does it best-effort for about a minute;
//!   here always, so a test sees every duplicate).
//! - Injected faults ([`Fault`]) answer the next requests with 5xx, 403
//!   `quotaExceeded`/`rateLimitExceeded` or 429 bodies as Google sends them.
//! - With [`Auth::Bearer`], insertAll wants `Authorization: Bearer <token>`
//!   with a token this server issued: from `POST /token` (the JWT-bearer
//!   grant, whose RS256 assertion is verified against [`TEST_PUBLIC_KEY`],
//!   with issuer, audience and scope checked) or from
//!   `GET /computeMetadata/v1/instance/service-accounts/default/token`
//!   (with `Metadata-Flavor: Google`). Anything else is a 401.

use std::collections::{HashSet, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

mod key;
pub use key::{TEST_PRIVATE_KEY, TEST_PUBLIC_KEY};

/// BigQuery's limits on one insertAll request.
pub const MAX_REQUEST_BYTES: usize = 10 * 1024 * 1024;
pub const MAX_REQUEST_ROWS: usize = 50_000;

/// The service account of [`FakeBigQuery::service_account_json`].
pub const SERVICE_ACCOUNT_EMAIL: &str = "expeditor-writer@fake-project.iam.gserviceaccount.com";

/// A service-account key file with only what is read before a token is
/// asked for (`type`, `client_email`, `private_key`): for tests of how
/// credentials are found and checked.
pub fn service_account_key(client_email: &str, private_key: &str) -> String {
    json!({
        "type": "service_account",
        "client_email": client_email,
        "private_key": private_key,
    })
    .to_string()
}
/// The scope a token must carry to stream rows.
pub const INSERT_SCOPE: &str = "https://www.googleapis.com/auth/bigquery.insertdata";

// ---- schema --------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    String,
    Integer,
    Float,
    Numeric,
    Boolean,
    Timestamp,
    Date,
    Json,
    Record,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Nullable,
    Required,
    Repeated,
}

#[derive(Debug, Clone)]
pub struct Field {
    pub name: String,
    pub ty: Type,
    pub mode: Mode,
    /// For [`Type::Record`].
    pub fields: Vec<Field>,
}

/// A `NULLABLE` column.
pub fn field(name: &str, ty: Type) -> Field {
    Field {
        name: name.to_owned(),
        ty,
        mode: Mode::Nullable,
        fields: Vec::new(),
    }
}

/// A `RECORD` column.
pub fn record(name: &str, fields: Vec<Field>) -> Field {
    Field {
        fields,
        ..field(name, Type::Record)
    }
}

impl Field {
    pub fn required(self) -> Field {
        Field {
            mode: Mode::Required,
            ..self
        }
    }

    pub fn repeated(self) -> Field {
        Field {
            mode: Mode::Repeated,
            ..self
        }
    }
}

/// The table rows go to.
#[derive(Debug, Clone)]
pub struct Table {
    pub project: String,
    pub dataset: String,
    pub table: String,
    pub schema: Vec<Field>,
}

/// The `orders` table of the warehouse example in `config.toml`: CrumbPOS and
/// Crave orders, one row per event.
pub fn orders_table() -> Table {
    Table {
        project: "fake-project".into(),
        dataset: "restaurant".into(),
        table: "orders".into(),
        schema: vec![
            field("event_id", Type::String).required(),
            field("order_id", Type::String).required(),
            field("source", Type::String).required(),
            field("event_type", Type::String),
            field("location_id", Type::String),
            field("channel", Type::String),
            field("total_cents", Type::Integer),
            field("tax_cents", Type::Integer),
            field("currency", Type::String),
            field("customer_id", Type::String),
            field("is_delivery", Type::Boolean),
            field("occurred_at", Type::Timestamp),
            field("received_at", Type::Timestamp).required(),
            record(
                "items",
                vec![
                    field("name", Type::String),
                    field("quantity", Type::Integer).required(),
                    field("unit_price_cents", Type::Integer),
                    field("total_cents", Type::Integer),
                    record(
                        "modifiers",
                        vec![
                            field("id", Type::String),
                            field("name", Type::String),
                            field("price_cents", Type::Integer),
                        ],
                    )
                    .repeated(),
                ],
            )
            .repeated(),
        ],
    }
}

// ---- faults ----------------------------------------------------------------

/// A canned failure for the next insertAll request, in Google's error shape.
#[derive(Debug, Clone)]
pub struct Fault {
    pub status: u16,
    /// `None` sends a non-Google body (`text/html`), as a proxy in front would.
    pub reason: Option<&'static str>,
    pub message: String,
    pub grpc_status: &'static str,
}

impl Fault {
    pub fn new(status: u16, reason: &'static str, grpc_status: &'static str, message: &str) -> Fault {
        Fault {
            status,
            reason: Some(reason),
            message: message.to_owned(),
            grpc_status,
        }
    }

    /// 503 `backendError`: "Retrying may solve the problem".
    pub fn backend_error() -> Fault {
        Fault::new(
            503,
            "backendError",
            "UNAVAILABLE",
            "Error encountered during execution. Retrying may solve the problem.",
        )
    }

    /// 500 `internalError`.
    pub fn internal_error() -> Fault {
        Fault::new(
            500,
            "internalError",
            "INTERNAL",
            "An internal error occurred and the request could not be completed.",
        )
    }

    /// 403 `quotaExceeded`, as a streaming quota answers.
    pub fn quota_exceeded() -> Fault {
        Fault::new(
            403,
            "quotaExceeded",
            "PERMISSION_DENIED",
            "Exceeded rate limits: too many api requests per user per method for this user_method. \
             For more information, see https://cloud.google.com/bigquery/docs/troubleshoot-quotas",
        )
    }

    /// 403 `rateLimitExceeded`.
    pub fn rate_limit_exceeded() -> Fault {
        Fault::new(
            403,
            "rateLimitExceeded",
            "PERMISSION_DENIED",
            "Exceeded rate limits: too many table update operations for this table.",
        )
    }

    /// 429 `RESOURCE_EXHAUSTED`.
    pub fn too_many_requests() -> Fault {
        Fault::new(
            429,
            "rateLimitExceeded",
            "RESOURCE_EXHAUSTED",
            "Too many requests for this table; retry later.",
        )
    }

    /// 403 `accessDenied`: the account may not write the table.
    pub fn access_denied() -> Fault {
        Fault::new(
            403,
            "accessDenied",
            "PERMISSION_DENIED",
            "Access Denied: Table fake-project:restaurant.orders: Permission bigquery.tables.updateData denied on table fake-project:restaurant.orders (or it may not exist).",
        )
    }

    /// A 502 from something in front of Google, with an HTML body.
    pub fn bad_gateway_html() -> Fault {
        Fault {
            status: 502,
            reason: None,
            message: "<html><body>502 Bad Gateway</body></html>".into(),
            grpc_status: "",
        }
    }
}

// ---- what the server saw -------------------------------------------------

/// A row in the table.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRow {
    pub insert_id: Option<String>,
    pub json: Value,
}

/// One insertAll request and what became of it.
#[derive(Debug, Clone)]
pub struct InsertCall {
    pub path: String,
    pub authorization: Option<String>,
    pub content_type: Option<String>,
    /// The parsed request body.
    pub body: Value,
    /// HTTP status answered.
    pub status: u16,
    /// The response body.
    pub response: Value,
}

impl InsertCall {
    /// `insertId` of each row, in request order.
    pub fn insert_ids(&self) -> Vec<String> {
        self.body["rows"]
            .as_array()
            .map(|rows| {
                rows.iter()
                    .map(|r| r["insertId"].as_str().unwrap_or_default().to_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `json` of each row, in request order.
    pub fn rows(&self) -> Vec<Value> {
        self.body["rows"]
            .as_array()
            .map(|rows| rows.iter().map(|r| r["json"].clone()).collect())
            .unwrap_or_default()
    }
}

/// How insertAll requests must authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// Anything goes (an emulator); the header is recorded.
    None,
    /// A bearer token this server issued.
    Bearer,
}

struct State {
    table: Table,
    auth: Auth,
    rows: Mutex<Vec<StoredRow>>,
    seen_ids: Mutex<HashSet<String>>,
    duplicates: AtomicUsize,
    calls: Mutex<Vec<InsertCall>>,
    faults: Mutex<VecDeque<Fault>>,
    tokens: Mutex<HashSet<String>>,
    missing: std::sync::atomic::AtomicBool,
    token_grants: Mutex<Vec<Value>>,
    metadata_grants: AtomicUsize,
    token_lifetime: Mutex<u64>,
    addr: SocketAddr,
}

pub struct FakeBigQuery {
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl Drop for FakeBigQuery {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeBigQuery {
    pub async fn start(table: Table, auth: Auth) -> FakeBigQuery {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(State {
            table,
            auth,
            rows: Mutex::new(Vec::new()),
            seen_ids: Mutex::new(HashSet::new()),
            duplicates: AtomicUsize::new(0),
            calls: Mutex::new(Vec::new()),
            faults: Mutex::new(VecDeque::new()),
            tokens: Mutex::new(HashSet::new()),
            missing: std::sync::atomic::AtomicBool::new(false),
            token_grants: Mutex::new(Vec::new()),
            metadata_grants: AtomicUsize::new(0),
            token_lifetime: Mutex::new(3599),
            addr,
        });
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(state.clone(), req));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FakeBigQuery { state, task }
    }

    /// `http://127.0.0.1:PORT`: the sink's `endpoint`.
    pub fn url(&self) -> String {
        format!("http://{}", self.state.addr)
    }

    /// `127.0.0.1:PORT`, for `GCE_METADATA_HOST`.
    pub fn metadata_host(&self) -> String {
        self.state.addr.to_string()
    }

    /// A service-account key file whose `token_uri` is this server.
    pub fn service_account_json(&self) -> String {
        json!({
            "type": "service_account",
            "project_id": self.state.table.project,
            "private_key_id": "0123456789abcdef0123456789abcdef01234567",
            "private_key": TEST_PRIVATE_KEY,
            "client_email": SERVICE_ACCOUNT_EMAIL,
            "client_id": "100000000000000000001",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": format!("{}/token", self.url()),
        })
        .to_string()
    }

    /// Seconds each issued token lives (Google: 3599). The client refreshes
    /// 10 s before expiry, so 11 makes it fetch a new one after a second.
    pub fn set_token_lifetime(&self, seconds: u64) {
        *self.state.token_lifetime.lock().unwrap() = seconds;
    }

    /// While `true`, the table does not exist (404 `notFound`), as before
    /// `bq mk` or after someone dropped it.
    pub fn set_table_missing(&self, missing: bool) {
        self.state.missing.store(missing, Ordering::SeqCst);
    }

    /// Answer the next insertAll requests with these faults, in order.
    pub fn fail_next(&self, faults: &[Fault]) {
        self.state.faults.lock().unwrap().extend(faults.iter().cloned());
    }

    /// The table's rows, in insertion order.
    pub fn rows(&self) -> Vec<StoredRow> {
        self.state.rows.lock().unwrap().clone()
    }

    /// Every insertAll request, in arrival order.
    pub fn calls(&self) -> Vec<InsertCall> {
        self.state.calls.lock().unwrap().clone()
    }

    /// Rows dropped because their `insertId` was inserted before.
    pub fn duplicates_dropped(&self) -> usize {
        self.state.duplicates.load(Ordering::SeqCst)
    }

    /// Claims of every JWT-bearer grant accepted by `/token`.
    pub fn token_grants(&self) -> Vec<Value> {
        self.state.token_grants.lock().unwrap().clone()
    }

    /// Tokens handed out by the metadata server.
    pub fn metadata_grants(&self) -> usize {
        self.state.metadata_grants.load(Ordering::SeqCst)
    }

    /// Polls until the table has `n` rows; panics after `timeout`.
    pub async fn wait_rows(&self, n: usize, timeout: Duration) -> Vec<StoredRow> {
        let deadline = Instant::now() + timeout;
        loop {
            let rows = self.rows();
            if rows.len() >= n {
                return rows;
            }
            if Instant::now() > deadline {
                panic!(
                    "fake BigQuery: expected {n} rows within {timeout:?}, have {}: {rows:#?}\ncalls: {:#?}",
                    rows.len(),
                    self.calls()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls until `n` insertAll requests arrived; panics after `timeout`.
    pub async fn wait_calls(&self, n: usize, timeout: Duration) -> Vec<InsertCall> {
        let deadline = Instant::now() + timeout;
        loop {
            let calls = self.calls();
            if calls.len() >= n {
                return calls;
            }
            if Instant::now() > deadline {
                panic!(
                    "fake BigQuery: expected {n} insertAll calls within {timeout:?}, got {}: {calls:#?}",
                    calls.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

// ---- HTTP ------------------------------------------------------------------

type Reply = Response<Full<Bytes>>;

fn reply(status: u16, content_type: &str, body: impl Into<Bytes>) -> Reply {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()))
        .expect("valid response")
}

fn json_reply(status: u16, body: &Value) -> Reply {
    reply(status, "application/json; charset=UTF-8", body.to_string())
}

/// `{"error": {"code", "message", "errors": [{"message", "domain", "reason"}], "status"}}`.
pub fn google_error(code: u16, reason: &str, status: &str, message: &str) -> Value {
    json!({
        "error": {
            "code": code,
            "message": message,
            "errors": [{"message": message, "domain": "global", "reason": reason}],
            "status": status,
        }
    })
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Reply, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let path = parts.uri.path().to_owned();
    let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let reply = if path == "/token" && parts.method == hyper::Method::POST {
        token_grant(&state, &body)
    } else if path.starts_with("/computeMetadata/v1/") && parts.method == hyper::Method::GET {
        metadata(&state, &path, header("metadata-flavor").as_deref())
    } else if let Some(rest) = path.strip_prefix("/bigquery/v2/projects/")
        && parts.method == hyper::Method::POST
    {
        let authorization = header("authorization");
        let content_type = header("content-type");
        let (status, response) = insert_all(&state, rest, authorization.as_deref(), content_type.as_deref(), &body);
        let parsed = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let out = match &response {
            Answer::Json(v) => json_reply(status, v),
            Answer::Html(h) => reply(status, "text/html", h.clone()),
        };
        state.calls.lock().unwrap().push(InsertCall {
            path,
            authorization,
            content_type,
            body: parsed,
            status,
            response: match response {
                Answer::Json(v) => v,
                Answer::Html(h) => Value::String(h),
            },
        });
        out
    } else {
        json_reply(
            404,
            &google_error(404, "notFound", "NOT_FOUND", &format!("No such method: {path}")),
        )
    };
    Ok(reply)
}

enum Answer {
    Json(Value),
    Html(String),
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn issue_token(state: &State, prefix: &str) -> Value {
    let mut tokens = state.tokens.lock().unwrap();
    let token = format!("ya29.{prefix}-{}", tokens.len() + 1);
    tokens.insert(token.clone());
    json!({
        "access_token": token,
        "expires_in": *state.token_lifetime.lock().unwrap(),
        "token_type": "Bearer",
    })
}

/// Google's OAuth 2.0 token endpoint, JWT-bearer grant (RFC 7523).
fn token_grant(state: &State, body: &[u8]) -> Reply {
    let form: Vec<(String, String)> = form_urlencoded::parse(body).into_owned().collect();
    let get = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let invalid =
        |error: &str, description: &str| json_reply(400, &json!({"error": error, "error_description": description}));
    if get("grant_type") != Some("urn:ietf:params:oauth:grant-type:jwt-bearer") {
        return invalid("unsupported_grant_type", "Invalid grant_type.");
    }
    let Some(assertion) = get("assertion") else {
        return invalid("invalid_request", "Missing required parameter: assertion");
    };
    let key = jsonwebtoken::DecodingKey::from_rsa_pem(TEST_PUBLIC_KEY.as_bytes()).expect("test public key");
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_audience(&[format!("http://{}/token", state.addr)]);
    validation.set_issuer(&[SERVICE_ACCOUNT_EMAIL]);
    validation.set_required_spec_claims(&["exp", "iat", "aud", "iss"]);
    let claims = match jsonwebtoken::decode::<Value>(assertion, &key, &validation) {
        Ok(data) => data.claims,
        Err(e) => return invalid("invalid_grant", &format!("Invalid JWT: {e}")),
    };
    let iat = claims["iat"].as_i64().unwrap_or_default();
    let exp = claims["exp"].as_i64().unwrap_or_default();
    if (iat - now_secs()).abs() > 300 || exp - iat > 3600 {
        return invalid(
            "invalid_grant",
            "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe.",
        );
    }
    let scopes = claims["scope"].as_str().unwrap_or_default();
    if !scopes.split(' ').any(|s| {
        s == INSERT_SCOPE
            || s == "https://www.googleapis.com/auth/bigquery"
            || s == "https://www.googleapis.com/auth/cloud-platform"
    }) {
        return invalid("invalid_scope", "No BigQuery scope in the assertion.");
    }
    state.token_grants.lock().unwrap().push(claims);
    json_reply(200, &issue_token(state, "sa"))
}

/// The GCE metadata server: a token for the default service account, and the project id.
fn metadata(state: &State, path: &str, flavor: Option<&str>) -> Reply {
    if flavor != Some("Google") {
        return reply(403, "text/html", "Missing Metadata-Flavor:Google header.");
    }
    match path {
        "/computeMetadata/v1/instance/service-accounts/default/token" => {
            state.metadata_grants.fetch_add(1, Ordering::SeqCst);
            json_reply(200, &issue_token(state, "md"))
        }
        "/computeMetadata/v1/project/project-id" => reply(200, "application/text", state.table.project.clone()),
        _ => reply(404, "text/html", "Not Found"),
    }
}

fn insert_all(
    state: &State,
    rest: &str,
    authorization: Option<&str>,
    content_type: Option<&str>,
    body: &[u8],
) -> (u16, Answer) {
    let err = |code: u16, reason: &str, status: &str, message: &str| {
        (code, Answer::Json(google_error(code, reason, status, message)))
    };
    if state.auth == Auth::Bearer {
        let token = authorization.and_then(|a| a.strip_prefix("Bearer "));
        match token {
            None => {
                return err(
                    401,
                    "required",
                    "UNAUTHENTICATED",
                    "Request is missing required authentication credential. Expected OAuth 2 access token, login cookie or other valid authentication credential.",
                );
            }
            Some(t) if !state.tokens.lock().unwrap().contains(t) => {
                return err(
                    401,
                    "authError",
                    "UNAUTHENTICATED",
                    "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential.",
                );
            }
            Some(_) => {}
        }
    }
    // projects/{p}/datasets/{d}/tables/{t}/insertAll
    let parts: Vec<&str> = rest.split('/').collect();
    let [project, "datasets", dataset, "tables", table, "insertAll"] = parts.as_slice() else {
        return err(404, "notFound", "NOT_FOUND", &format!("No such method: {rest}"));
    };
    let t = &state.table;
    if (*project, *dataset, *table) != (t.project.as_str(), t.dataset.as_str(), t.table.as_str())
        || state.missing.load(Ordering::SeqCst)
    {
        let message = format!("Not found: Table {project}:{dataset}.{table}");
        return err(404, "notFound", "NOT_FOUND", &message);
    }
    if let Some(fault) = state.faults.lock().unwrap().pop_front() {
        return match fault.reason {
            Some(reason) => err(fault.status, reason, fault.grpc_status, &fault.message),
            None => (fault.status, Answer::Html(fault.message)),
        };
    }
    if !content_type.is_some_and(|c| c.starts_with("application/json")) {
        return err(
            400,
            "invalid",
            "INVALID_ARGUMENT",
            "Content-Type must be application/json.",
        );
    }
    if body.len() > MAX_REQUEST_BYTES {
        return err(
            400,
            "invalid",
            "INVALID_ARGUMENT",
            &format!("Request payload size exceeds the limit: {MAX_REQUEST_BYTES} bytes."),
        );
    }
    let request: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return err(
                400,
                "invalid",
                "INVALID_ARGUMENT",
                &format!("Invalid JSON payload received. {e}"),
            );
        }
    };
    let Some(rows) = request.get("rows").and_then(Value::as_array).filter(|r| !r.is_empty()) else {
        return err(400, "invalid", "INVALID_ARGUMENT", "No rows present in the request.");
    };
    if rows.len() > MAX_REQUEST_ROWS {
        let message = format!(
            "too many rows present in the request, limit: {MAX_REQUEST_ROWS} row count: {}.",
            rows.len()
        );
        return err(400, "invalid", "INVALID_ARGUMENT", &message);
    }
    for key in request.as_object().into_iter().flat_map(|o| o.keys()) {
        if ![
            "rows",
            "skipInvalidRows",
            "ignoreUnknownValues",
            "templateSuffix",
            "traceId",
            "kind",
        ]
        .contains(&key.as_str())
        {
            let message = format!("Invalid JSON payload received. Unknown name \"{key}\": Cannot find field.");
            return err(400, "invalid", "INVALID_ARGUMENT", &message);
        }
    }
    let skip_invalid = request["skipInvalidRows"].as_bool().unwrap_or(false);
    let ignore_unknown = request["ignoreUnknownValues"].as_bool().unwrap_or(false);

    let mut parsed = Vec::with_capacity(rows.len());
    let mut row_errors: Vec<(usize, Vec<Value>)> = Vec::new();
    for (index, row) in rows.iter().enumerate() {
        let Some(json) = row.get("json").and_then(Value::as_object) else {
            let message = format!("Invalid JSON payload received. rows[{index}].json must be an object.");
            return err(400, "invalid", "INVALID_ARGUMENT", &message);
        };
        let insert_id = match row.get("insertId") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => {
                let message = format!("Invalid value at 'rows[{index}].insert_id' (TYPE_STRING).");
                return err(400, "invalid", "INVALID_ARGUMENT", &message);
            }
        };
        let mut errors = Vec::new();
        let mut cleaned = json.clone();
        check_record(&t.schema, &mut cleaned, "", ignore_unknown, &mut errors);
        if !errors.is_empty() {
            row_errors.push((index, errors));
        }
        parsed.push(StoredRow {
            insert_id,
            json: Value::Object(cleaned),
        });
    }

    let bad: HashSet<usize> = row_errors.iter().map(|(i, _)| *i).collect();
    let insert_good = bad.is_empty() || skip_invalid;
    let mut insert_errors: Vec<Value> = Vec::new();
    for (index, row) in parsed.into_iter().enumerate() {
        if bad.contains(&index) {
            continue;
        }
        if !insert_good {
            insert_errors.push(json!({
                "index": index,
                "errors": [{"reason": "stopped", "location": "", "debugInfo": "", "message": ""}],
            }));
            continue;
        }
        if let Some(id) = &row.insert_id
            && !state.seen_ids.lock().unwrap().insert(id.clone())
        {
            state.duplicates.fetch_add(1, Ordering::SeqCst);
            continue;
        }
        state.rows.lock().unwrap().push(row);
    }
    for (index, errors) in row_errors {
        insert_errors.push(json!({"index": index, "errors": errors}));
    }
    insert_errors.sort_by_key(|e| e["index"].as_u64());
    let mut response = json!({"kind": "bigquery#tableDataInsertAllResponse"});
    if !insert_errors.is_empty() {
        response["insertErrors"] = Value::Array(insert_errors);
    }
    (200, Answer::Json(response))
}

fn invalid(location: &str, message: String) -> Value {
    json!({"reason": "invalid", "location": location, "debugInfo": "", "message": message})
}

/// Checks one record against its fields; unknown values are dropped when
/// `ignore_unknown` (and reported otherwise).
fn check_record(
    schema: &[Field],
    row: &mut Map<String, Value>,
    prefix: &str,
    ignore_unknown: bool,
    errors: &mut Vec<Value>,
) {
    let path = |name: &str| {
        if prefix.is_empty() {
            name.to_owned()
        } else {
            format!("{prefix}.{name}")
        }
    };
    let unknown: Vec<String> = row
        .keys()
        .filter(|k| !schema.iter().any(|f| f.name.eq_ignore_ascii_case(k)))
        .cloned()
        .collect();
    for name in unknown {
        if ignore_unknown {
            row.remove(&name);
        } else {
            let location = path(&name);
            errors.push(invalid(&location, format!("no such field: {location}.")));
        }
    }
    for f in schema {
        let location = path(&f.name);
        let value = row
            .iter_mut()
            .find(|(k, _)| k.eq_ignore_ascii_case(&f.name))
            .map(|(_, v)| v);
        match (value, f.mode) {
            (None | Some(Value::Null), Mode::Required) => {
                errors.push(invalid(&location, format!("Missing required field: {location}.")));
            }
            (None | Some(Value::Null), _) => {}
            (Some(Value::Array(items)), Mode::Repeated) => {
                for item in items.iter_mut() {
                    if item.is_null() {
                        errors.push(invalid(&location, format!("Null value in repeated field: {location}.")));
                    } else {
                        check_value(f, item, &location, ignore_unknown, errors);
                    }
                }
            }
            (Some(Value::Array(_)), _) => {
                errors.push(invalid(
                    &location,
                    format!("Array specified for non-repeated field: {location}."),
                ));
            }
            (Some(_), Mode::Repeated) => {
                errors.push(invalid(
                    &location,
                    format!("Field {location} is REPEATED: the value must be an array."),
                ));
            }
            (Some(v), _) => check_value(f, v, &location, ignore_unknown, errors),
        }
    }
}

fn check_value(f: &Field, v: &mut Value, location: &str, ignore_unknown: bool, errors: &mut Vec<Value>) {
    let shown = match &*v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let bad = |what: &str| invalid(location, format!("Cannot convert value to {what} (bad value): {shown}"));
    match (f.ty, &mut *v) {
        (Type::Record, Value::Object(map)) => check_record(&f.fields, map, location, ignore_unknown, errors),
        (Type::Record, _) => errors.push(invalid(location, format!("This field: {location} is not a record."))),
        (_, Value::Object(_)) if f.ty != Type::Json => {
            errors.push(invalid(location, format!("This field: {location} is not a record.")))
        }
        (Type::String, _) => {}
        (Type::Json, _) => {}
        (Type::Integer, Value::Number(n)) if n.is_i64() || n.is_u64() => {}
        (Type::Integer, Value::String(s)) if s.trim().parse::<i64>().is_ok() => {}
        (Type::Integer, _) => errors.push(bad("integer")),
        (Type::Float | Type::Numeric, Value::Number(_)) => {}
        (Type::Float | Type::Numeric, Value::String(s)) if s.trim().parse::<f64>().is_ok() => {}
        (Type::Float, _) => errors.push(bad("floating point")),
        (Type::Numeric, _) => errors.push(bad("numeric")),
        (Type::Boolean, Value::Bool(_)) => {}
        (Type::Boolean, Value::String(s)) if ["true", "false", "1", "0"].contains(&s.to_ascii_lowercase().as_str()) => {
        }
        (Type::Boolean, _) => errors.push(bad("boolean")),
        (Type::Timestamp, Value::Number(_)) => {}
        (Type::Timestamp, Value::String(s)) if is_timestamp(s) => {}
        (Type::Timestamp, _) => errors.push(invalid(
            location,
            format!(
                "Couldn't convert value to timestamp: Could not parse '{shown}' as a timestamp. \
                 Required format is YYYY-MM-DD HH:MM[:SS[.SSSSSS]] or YYYY/MM/DD HH:MM[:SS[.SSSSSS]]"
            ),
        )),
        (Type::Date, Value::String(s)) if is_date(&s[..s.len().min(10)]) && s.len() == 10 => {}
        (Type::Date, _) => errors.push(invalid(
            location,
            format!("Invalid date: '{shown}'. Required format is YYYY-MM-DD"),
        )),
    }
}

fn is_date(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit())
}

/// `YYYY-MM-DD[T| ]HH:MM[:SS[.ffffff]][Z|±HH:MM| UTC]`.
fn is_timestamp(s: &str) -> bool {
    let s = s.trim();
    if s.len() < 16 || !is_date(&s[..10]) {
        return false;
    }
    let b = s.as_bytes();
    if !(b[10] == b'T' || b[10] == b't' || b[10] == b' ') {
        return false;
    }
    let time = &s[11..];
    let (time, zone) = match time.find(['Z', 'z', '+', '-', ' ']) {
        Some(i) => time.split_at(i),
        None => (time, ""),
    };
    let zone_ok = matches!(zone, "" | "Z" | "z" | " UTC")
        || (zone.len() == 6 && zone[1..3].bytes().all(|c| c.is_ascii_digit()) && &zone[3..4] == ":");
    let mut parts = time.splitn(3, ':');
    let (Some(h), Some(m)) = (parts.next(), parts.next()) else {
        return false;
    };
    let secs_ok = parts.next().is_none_or(|sec| {
        let (whole, frac) = sec.split_once('.').unwrap_or((sec, "0"));
        whole.len() == 2 && whole.bytes().all(|c| c.is_ascii_digit()) && frac.bytes().all(|c| c.is_ascii_digit())
    });
    h.len() == 2 && m.len() == 2 && h.bytes().chain(m.bytes()).all(|c| c.is_ascii_digit()) && secs_ok && zone_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        for ok in [
            "2026-11-23T10:00:00Z",
            "2026-11-23 10:00:00",
            "2026-11-23T10:00:00.123456+01:00",
            "2026-11-23 10:00 UTC",
        ] {
            assert!(is_timestamp(ok), "{ok}");
        }
        for bad in ["yesterday", "2026-11-23", "2026-11-23T10", "2026-11-23T1a:00:00Z"] {
            assert!(!is_timestamp(bad), "{bad}");
        }
    }

    #[test]
    fn rows_are_checked_against_the_schema() {
        let schema = orders_table().schema;
        let mut errors = Vec::new();
        let mut row = json!({
            "event_id": "e", "order_id": "ord_1", "source": "crumb", "received_at": "2026-11-23T10:00:00Z",
            "total_cents": "27.98", "is_delivery": "yes", "bogus": 1,
            "items": [{"name": "Pizza"}],
        });
        check_record(&schema, row.as_object_mut().unwrap(), "", false, &mut errors);
        let locations: Vec<&str> = errors.iter().map(|e| e["location"].as_str().unwrap()).collect();
        assert_eq!(
            locations,
            ["bogus", "total_cents", "is_delivery", "items.quantity"],
            "{errors:#?}"
        );
        let mut row = json!({"event_id": "e", "order_id": "o", "source": "s", "received_at": "2026-11-23 10:00:00",
            "items": [{"quantity": 1, "modifiers": [{"name": "Extra cheese", "price_cents": 150, "size": "L"}]}]});
        errors.clear();
        check_record(&schema, row.as_object_mut().unwrap(), "", false, &mut errors);
        assert_eq!(
            errors,
            [invalid(
                "items.modifiers.size",
                "no such field: items.modifiers.size.".into()
            )]
        );
        assert!(errors.iter().all(|e| e["reason"] == "invalid"));
    }
}
