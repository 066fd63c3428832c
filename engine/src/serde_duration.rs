//! Durations in JSON as fractional seconds: what jq, Prometheus and spreadsheets all read.

use std::time::Duration;

use serde::Serializer;

pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((d.as_secs_f64() * 1000.0).round() / 1000.0)
}
