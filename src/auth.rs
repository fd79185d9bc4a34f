//! Tokens: how a request carries one (`Authorization: Bearer T` or `?token=T`) and whether it
//! is acceptable for a list of configured tokens (`[auth] client_tokens`, `ingest_tokens`).
//! Shared by the `/ws` session (the late `auth` op) and the HTTP routes; it imports nothing
//! from the rest of the crate.

use axum::http::{header, HeaderMap};

/// How a connection stands with authentication when it is upgraded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthState {
    /// No token needed, or a valid one came with the upgrade request.
    Authorized,
    /// A token came and it is wrong: close 4001 at once.
    Rejected,
    /// Tokens are required and none came: wait for the `auth` op.
    Pending,
}

impl AuthState {
    /// Where an upgrade carrying `token` stands against `tokens` (empty: none needed).
    #[must_use]
    pub fn of(tokens: &[String], token: Option<&str>) -> Self {
        match token {
            _ if tokens.is_empty() => Self::Authorized,
            Some(t) if token_ok(tokens, Some(t)) => Self::Authorized,
            Some(_) => Self::Rejected,
            None => Self::Pending,
        }
    }
}

/// Whether `token` is acceptable for a route guarded by `tokens` (empty: no token needed).
#[must_use]
pub fn token_ok(tokens: &[String], token: Option<&str>) -> bool {
    tokens.is_empty()
        || token.is_some_and(|t| {
            tokens
                .iter()
                .any(|k| constant_time_eq(k.as_bytes(), t.as_bytes()))
        })
}

/// Compares without an early exit so response timing does not leak how much of a token matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token a request carries: `Authorization: Bearer T`, else `?token=T` (`query_token`).
#[must_use]
pub fn request_token<'a>(headers: &'a HeaderMap, query_token: Option<&'a str>) -> Option<&'a str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)
        .or(query_token)
}

/// The token of a `Bearer` credential. The scheme is case-insensitive (RFC 9110 11.1) and
/// clients differ in the spaces they put around the token, so any case and any run of spaces
/// or tabs pass; an empty token is no token.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once([' ', '\t'])?;
    let token = token.trim_matches([' ', '\t']);
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}
