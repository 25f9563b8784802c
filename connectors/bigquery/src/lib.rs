//! The `bigquery` sink: each delivery becomes one row streamed into a table
//! with `tabledata.insertAll`, its delivery key the row's `insertId`.
//!
//! # Why insertAll, and this client
//! `tabledata.insertAll` is BigQuery's REST streaming insert: JSON rows,
//! per-row errors, and an `insertId` that BigQuery uses to drop a row it has
//! already seen (best-effort, for about a minute). Google recommends the
//! Storage Write API for new work (gRPC, protobuf rows, exactly-once only
//! with application-created streams and offsets); its official Rust client,
//! `google-cloud-bigquery` (0.16 on), has no insertAll. The community client
//! that has it is `gcloud-bigquery` (`tabledata().insert`), which also finds
//! credentials the standard way; it is used here.
//!
//! # skipInvalidRows
//! Requests set `skipInvalidRows: true`: the good rows of a batch are inserted
//! by the same request and only the rows BigQuery calls `invalid` come back,
//! to be dead-lettered. With BigQuery's default (`false`) one bad row stops the
//! whole request; the others come back `stopped`, cost another request, and
//! use up an attempt each time a bad neighbour stops them. `stopped` rows are
//! still handled (retried at once) should BigQuery send them.
//!
//! # Layout
//! - `config`: [`BigQuerySinkConfig`], BigQuery's limits, and the id checks
//!   the config module runs at load.
//! - `auth`: the rule `expeditor check` applies ([`check_auth`]).
//! - `rows`: renders deliveries into rows and packs them into requests.
//! - `outcome`: BigQuery's answers, row by row.
//! - `sink`: [`BigQuerySink`].

mod auth;
mod config;
mod outcome;
mod rows;
mod sink;

#[cfg(test)]
mod tests;

pub use auth::{DMI_PRODUCT_NAME, check_auth};
pub use config::{
    Auth, BigQuerySinkConfig, DEFAULT_MAX_BYTES, DEFAULT_MAX_ROWS, MAX_BYTES_LIMIT, MAX_ROWS_LIMIT, check_dataset,
    check_endpoint, check_project, check_table,
};
pub use sink::BigQuerySink;
