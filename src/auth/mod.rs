//! Tokens: how a request carries one (`Authorization: Bearer T`, `?token=T`, or the `/ws`
//! `auth` op) and what it grants. [`Verifier`] is the one check every path calls: a static
//! token from `[auth] client_tokens` / `ingest_tokens` grants everything, as it always did; a
//! JWT ([`jwt`], when `[auth]` configures a key) grants what its claims say ([`Grant`]: the
//! symbols it may read or publish, and until when). Shared by the `/ws` and `/ingest` sessions
//! and the HTTP routes, which call into it; it is a leaf: it imports only the configuration
//! and error types, never the session, dispatch or transport layers.
//!
//! Hygiene lives here too: comparisons of static tokens are constant-time, errors carry a
//! reason and never the token, and [`redact_query`] takes `token=` values out of a URL before
//! it is logged.

pub mod jwt;
pub mod patterns;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::http::{header, HeaderMap};

use self::jwt::{JwtVerifier, TokenGrant};
pub use self::patterns::SymbolPatterns;
use crate::config::AuthConfig;
use crate::error::ConfigError;
use crate::protocol::ErrorCode;

/// Why a token was refused. Never carries the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// A token is needed and none came.
    #[error("a token is required")]
    Missing,
    /// Not a configured static token, and not a well-formed JWT with valid claims.
    #[error("invalid token")]
    Invalid,
    /// A JWT whose signature does not verify.
    #[error("invalid token signature")]
    BadSignature,
    /// A JWT signed with another algorithm than the configured one (or `none`).
    #[error("token algorithm not accepted")]
    WrongAlgorithm,
    /// A JWT past its `exp` (plus the leeway).
    #[error("token expired")]
    Expired,
    /// A JWT before its `nbf` (minus the leeway).
    #[error("token not valid yet (nbf)")]
    NotYetValid,
    /// A valid JWT without `"ingest": true` on a producer route.
    #[error("token does not allow publishing (no \"ingest\": true)")]
    NotProducer,
    /// A JWT with a signature that verifies but claims that cannot be used: a `symbols` or
    /// `ingest_symbols` list that is `null`, over `auth.jwt_max_patterns`, or holds a
    /// malformed pattern; or an `nbf` that is not a number.
    #[error("token claims not usable: symbols/ingest_symbols must be a list of at most auth.jwt_max_patterns patterns (NAME, PREFIX* or *), nbf a number")]
    BadClaims,
}

impl AuthError {
    /// Every reason, in [`AuthError::reason`]'s order: the `reason` label values of
    /// `tickfan_auth_failures_total`.
    pub const REASONS: [&'static str; 8] = [
        "missing",
        "invalid",
        "bad_signature",
        "wrong_algorithm",
        "expired",
        "not_yet_valid",
        "not_producer",
        "bad_claims",
    ];

    fn index(self) -> usize {
        match self {
            Self::Missing => 0,
            Self::Invalid => 1,
            Self::BadSignature => 2,
            Self::WrongAlgorithm => 3,
            Self::Expired => 4,
            Self::NotYetValid => 5,
            Self::NotProducer => 6,
            Self::BadClaims => 7,
        }
    }

    /// The metrics label of this reason.
    #[must_use]
    pub fn reason(self) -> &'static str {
        Self::REASONS[self.index()]
    }

    /// The wire error code: `token_expired`, `forbidden` (a valid token that does not allow
    /// the route), or `unauthorized`.
    #[must_use]
    pub fn code(self) -> ErrorCode {
        match self {
            Self::Expired => ErrorCode::TokenExpired,
            Self::NotProducer => ErrorCode::Forbidden,
            _ => ErrorCode::Unauthorized,
        }
    }
}

/// Which token list and which claims a route checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `/ws` and the read APIs: `client_tokens`, or any valid JWT.
    Client,
    /// `/ingest` and `POST /api/ticks`: `ingest_tokens`, or a JWT with `"ingest": true`.
    Producer,
}

/// What an accepted token allows. Static tokens, and routes with auth off, grant everything
/// with no expiry, which is the default and costs no allocation; a JWT's grant is shared.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grant(Option<Arc<TokenGrant>>);

impl Grant {
    /// Everything, with no expiry (a static token, or auth off).
    #[must_use]
    pub fn full() -> Self {
        Self(None)
    }

    /// The grant of a verified JWT.
    #[must_use]
    pub fn from_token(grant: TokenGrant) -> Self {
        Self(Some(Arc::new(grant)))
    }

    /// The token's `sub`, for logs.
    #[must_use]
    pub fn sub(&self) -> Option<&str> {
        self.0.as_ref().and_then(|g| g.sub.as_deref())
    }

    /// The symbols it may read (`None`: all).
    #[must_use]
    pub fn symbols(&self) -> Option<&Arc<SymbolPatterns>> {
        self.0.as_ref().and_then(|g| g.symbols.as_ref())
    }

    /// The symbols it may publish (`None`: all).
    #[must_use]
    pub fn ingest_symbols(&self) -> Option<&Arc<SymbolPatterns>> {
        self.0.as_ref().and_then(|g| g.ingest_symbols.as_ref())
    }

    /// Whether it may read `symbol`.
    #[must_use]
    pub fn may_read(&self, symbol: &str) -> bool {
        SymbolPatterns::permits(self.symbols().map(Arc::as_ref), symbol)
    }

    /// When it stops being accepted (`exp` plus the leeway), in Unix ms; `None`: never.
    #[must_use]
    pub fn expires_at_ms(&self) -> Option<u64> {
        self.0.as_ref().map(|g| g.expires_at_ms)
    }
}

/// Counts of refused tokens, by reason.
#[derive(Debug, Default)]
pub struct AuthStats {
    failures: [AtomicU64; AuthError::REASONS.len()],
}

impl AuthStats {
    /// Refusals so far for each of [`AuthError::REASONS`], in that order.
    #[must_use]
    pub fn failures(&self) -> [u64; AuthError::REASONS.len()] {
        std::array::from_fn(|i| self.failures[i].load(Ordering::Relaxed))
    }
}

/// The token check of every route: static tokens, then the JWT key, if any.
#[derive(Default)]
pub struct Verifier {
    client_tokens: Vec<String>,
    ingest_tokens: Vec<String>,
    jwt: Option<JwtVerifier>,
    /// Refusals by reason.
    pub stats: AuthStats,
}

impl std::fmt::Debug for Verifier {
    // The static tokens stay out of debug output: only how many there are.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("client_tokens", &self.client_tokens.len())
            .field("ingest_tokens", &self.ingest_tokens.len())
            .field("jwt", &self.jwt)
            .field("stats", &self.stats)
            .finish()
    }
}

impl Verifier {
    /// The verifier `[auth]` configures (reads the JWT key file, if one is set).
    ///
    /// # Errors
    /// The JWT settings are unusable (see [`JwtVerifier::from_config`]).
    pub fn new(auth: &AuthConfig) -> Result<Self, ConfigError> {
        Ok(Self {
            client_tokens: auth.client_tokens.clone(),
            ingest_tokens: auth.ingest_tokens.clone(),
            jwt: JwtVerifier::from_config(auth)?,
            stats: AuthStats::default(),
        })
    }

    /// Whether `role`'s routes need a token: static tokens are configured for it, or a JWT
    /// key (which turns auth on for clients and producers alike).
    #[must_use]
    pub fn required(&self, role: Role) -> bool {
        self.jwt.is_some() || !self.statics(role).is_empty()
    }

    fn statics(&self, role: Role) -> &[String] {
        match role {
            Role::Client => &self.client_tokens,
            Role::Producer => &self.ingest_tokens,
        }
    }

    /// What `token` grants on `role`'s routes, or why it is refused (counted).
    ///
    /// # Errors
    /// The refusal's reason.
    pub fn check(&self, role: Role, token: Option<&str>) -> Result<Grant, AuthError> {
        let verdict = self.verdict(role, token);
        if let Err(e) = verdict {
            self.stats.failures[e.index()].fetch_add(1, Ordering::Relaxed);
        }
        verdict
    }

    fn verdict(&self, role: Role, token: Option<&str>) -> Result<Grant, AuthError> {
        if !self.required(role) {
            return Ok(Grant::full());
        }
        let token = token.ok_or(AuthError::Missing)?;
        let statics = self.statics(role);
        if !statics.is_empty() && token_ok(statics, Some(token)) {
            return Ok(Grant::full());
        }
        let Some(jwt) = &self.jwt else {
            return Err(AuthError::Invalid);
        };
        let grant = jwt.verify(token)?;
        if role == Role::Producer && !grant.ingest {
            return Err(AuthError::NotProducer);
        }
        Ok(Grant::from_token(grant))
    }
}

/// How a `/ws` connection stands with authentication when it is upgraded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthState {
    /// No token needed, or a valid one came with the upgrade request.
    Authorized(Grant),
    /// A token came and it is refused: close 4001 at once.
    Rejected(AuthError),
    /// Tokens are required and none came: wait for the `auth` op.
    Pending,
}

impl AuthState {
    /// Where an upgrade carrying `token` stands.
    #[must_use]
    pub fn of(verifier: &Verifier, token: Option<&str>) -> Self {
        if token.is_none() && verifier.required(Role::Client) {
            return Self::Pending;
        }
        match verifier.check(Role::Client, token) {
            Ok(grant) => Self::Authorized(grant),
            Err(e) => Self::Rejected(e),
        }
    }
}

/// `uri` (a path with its query, or a whole URL) with the value of every `token` query
/// parameter replaced by `REDACTED`: what may be logged of a URL.
#[must_use]
pub fn redact_query(uri: &str) -> std::borrow::Cow<'_, str> {
    let Some((head, query)) = uri.split_once('?') else {
        return uri.into();
    };
    let (query, fragment) = match query.split_once('#') {
        Some((q, f)) => (q, Some(f)),
        None => (query, None),
    };
    // The key as the route's query parser reads it (`tok%65n` is `token` to it).
    let is_token = |kv: &str| {
        form_urlencoded::parse(kv.as_bytes())
            .next()
            .is_some_and(|(k, _)| k == "token")
    };
    if !query.split('&').any(is_token) {
        return uri.into();
    }
    let pairs: Vec<&str> = query
        .split('&')
        .map(|kv| if is_token(kv) { "token=REDACTED" } else { kv })
        .collect();
    let mut out = format!("{head}?{}", pairs.join("&"));
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    out.into()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_queries_are_redacted() {
        assert_eq!(redact_query("/ws?token=s3cret"), "/ws?token=REDACTED");
        assert_eq!(
            redact_query("wss://h/ws?a=1&token=s3cret&b=2#x"),
            "wss://h/ws?a=1&token=REDACTED&b=2#x"
        );
        assert_eq!(redact_query("/api/symbols?limit=3"), "/api/symbols?limit=3");
        assert_eq!(redact_query("/ws?tokens=1"), "/ws?tokens=1");
        // The key as the query parser reads it: percent-encoded forms are the same key.
        assert_eq!(redact_query("/ws?tok%65n=s3cret"), "/ws?token=REDACTED");
        assert_eq!(
            redact_query("/ws?a=1&%74%6F%6B%65%6E=s3cret"),
            "/ws?a=1&token=REDACTED"
        );
    }

    #[test]
    fn static_tokens_grant_everything_and_missing_ones_wait() {
        let auth = AuthConfig {
            client_tokens: vec!["c".into()],
            ..AuthConfig::default()
        };
        let v = Verifier::new(&auth).unwrap();
        assert_eq!(v.check(Role::Client, Some("c")), Ok(Grant::full()));
        assert_eq!(v.check(Role::Client, Some("x")), Err(AuthError::Invalid));
        assert_eq!(v.check(Role::Producer, None), Ok(Grant::full()));
        assert_eq!(AuthState::of(&v, None), AuthState::Pending);
        assert_eq!(v.stats.failures()[AuthError::Invalid.index()], 1);
    }

    #[test]
    fn debug_output_never_shows_a_secret_or_token() {
        let auth = AuthConfig {
            client_tokens: vec!["client-secret-tok".into()],
            ingest_tokens: vec!["ingest-secret-tok".into()],
            jwt_hs256_secret: Some("hs256-secret-of-at-least-32-bytes!!".into()),
            ..AuthConfig::default()
        };
        let v = Verifier::new(&auth).unwrap();
        let request = crate::protocol::Request::Auth {
            token: "op-secret-tok".into(),
        };
        let config = crate::config::Config {
            auth: auth.clone(),
            ..crate::config::Config::default()
        };
        for shown in [
            format!("{auth:?}"),
            format!("{v:?}"),
            format!("{request:?}"),
            format!("{config:?}"),
        ] {
            for secret in [
                "client-secret-tok",
                "ingest-secret-tok",
                "hs256-secret",
                "op-secret-tok",
            ] {
                assert!(!shown.contains(secret), "{secret} in {shown}");
            }
        }
    }
}
