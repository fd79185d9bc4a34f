//! JWT verification through `jsonwebtoken`: the key and the one algorithm it is pinned to come
//! from `[auth]` (an HS256 secret, or a PEM public key whose type picks RS256 or ES256 unless
//! `jwt_algorithm` names another of its family), and a verified token's claims become a
//! [`TokenGrant`]. A token signed with any other algorithm (including `none`, and HS256 when a
//! public key is configured, the classic key-confusion attack) is refused before its signature
//! is looked at. `exp` is required; `nbf`, and `aud`/`iss` when configured, are checked; the
//! leeway (`jwt_leeway_secs`) applies to `exp` and `nbf`.

use std::collections::HashSet;
use std::sync::Arc;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::patterns::SymbolPatterns;
use super::AuthError;
use crate::config::AuthConfig;
use crate::error::ConfigError;

/// Longest `sub` kept for logs; longer ones are cut (a `sub` is the issuer's, but log lines
/// stay bounded anyway).
const MAX_SUB_CHARS: usize = 128;

/// What a verified token allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenGrant {
    /// The `sub` claim, for logs.
    pub sub: Option<Box<str>>,
    /// Symbols the holder may read (`None`: all).
    pub symbols: Option<Arc<SymbolPatterns>>,
    /// Whether the holder may publish (`"ingest": true`).
    pub ingest: bool,
    /// Symbols the holder may publish (`None`: all, when `ingest` is set).
    pub ingest_symbols: Option<Arc<SymbolPatterns>>,
    /// When the token stops being accepted: `exp` plus the leeway, in Unix ms.
    pub expires_at_ms: u64,
}

/// The claims tickfan reads; others are ignored.
#[derive(Debug, Deserialize)]
struct Claims {
    /// A NumericDate (RFC 7519 2: seconds, fractions allowed); required.
    exp: f64,
    /// Checked here rather than by `jsonwebtoken`, which reads only whole seconds and skips
    /// a fractional `nbf` unchecked. A present non-number (`null` included) is refused.
    #[serde(default, deserialize_with = "present")]
    nbf: Option<Option<f64>>,
    #[serde(default)]
    sub: Option<String>,
    /// Absent: all symbols; `null`: refused (see [`present`]).
    #[serde(default, deserialize_with = "present")]
    symbols: Option<Option<Vec<String>>>,
    #[serde(default)]
    ingest: bool,
    #[serde(default, deserialize_with = "present")]
    ingest_symbols: Option<Option<Vec<String>>>,
}

/// Tells a present `null` (`Some(None)`) from an absent claim (`None`, by `default`). A list
/// claim written as `null` is what Go's encoding/json makes of a nil slice, a user with no
/// entitlements; reading it as "absent" would grant every symbol, so it is refused instead.
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// The configured key and its pinned algorithm.
pub struct JwtVerifier {
    key: DecodingKey,
    algorithm: Algorithm,
    validation: Validation,
    leeway_secs: u64,
    /// `auth.jwt_max_patterns`.
    max_patterns: usize,
}

impl std::fmt::Debug for JwtVerifier {
    // The key stays out of any debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("algorithm", &self.algorithm)
            .field("leeway_secs", &self.leeway_secs)
            .finish_non_exhaustive()
    }
}

fn invalid(why: String) -> ConfigError {
    ConfigError::Invalid(why)
}

impl JwtVerifier {
    /// The verifier `[auth]` configures, if it configures one (reads the key file).
    ///
    /// # Errors
    /// Both a secret and a key file, a secret under 32 bytes, an unreadable or unusable key
    /// file, or a `jwt_algorithm` that does not fit the key.
    pub fn from_config(auth: &AuthConfig) -> Result<Option<Self>, ConfigError> {
        let (key, algorithm) = match (&auth.jwt_hs256_secret, &auth.jwt_public_key_file) {
            (None, None) => {
                // Settings that only mean something with a key would be ignored silently.
                if !auth.jwt_algorithm.is_empty()
                    || auth.jwt_audience.is_some()
                    || auth.jwt_issuer.is_some()
                {
                    return Err(invalid(
                        "auth.jwt_algorithm, jwt_audience and jwt_issuer need a JWT key: set auth.jwt_hs256_secret or auth.jwt_public_key_file".into(),
                    ));
                }
                return Ok(None);
            }
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "auth.jwt_hs256_secret and auth.jwt_public_key_file: set one, not both".into(),
                ))
            }
            (Some(secret), None) => {
                if secret.len() < 32 {
                    return Err(invalid(
                        "auth.jwt_hs256_secret: must be at least 32 bytes".into(),
                    ));
                }
                if !matches!(auth.jwt_algorithm.as_str(), "" | "HS256") {
                    return Err(invalid(
                        "auth.jwt_algorithm: an HS256 secret verifies HS256 only".into(),
                    ));
                }
                (
                    DecodingKey::from_secret(secret.as_bytes()),
                    Algorithm::HS256,
                )
            }
            (None, Some(path)) => {
                let pem = std::fs::read(path).map_err(|e| {
                    invalid(format!(
                        "auth.jwt_public_key_file: cannot read {}: {e}",
                        path.display()
                    ))
                })?;
                public_key(&pem, &auth.jwt_algorithm)?
            }
        };
        let mut validation = Validation::new(algorithm);
        // `exp` (required) and `nbf` are read as NumericDates and checked in `verify`.
        validation.leeway = auth.jwt_leeway_secs;
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.required_spec_claims = HashSet::new();
        match &auth.jwt_audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &auth.jwt_issuer {
            validation.set_issuer(&[iss]);
            validation.required_spec_claims.insert("iss".to_owned());
        }
        Ok(Some(Self {
            key,
            algorithm,
            validation,
            leeway_secs: auth.jwt_leeway_secs,
            max_patterns: auth.jwt_max_patterns,
        }))
    }

    /// The algorithm tokens must be signed with.
    #[must_use]
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// Verifies `token` and reads its grant.
    ///
    /// # Errors
    /// Why the token is refused (never says more than the reason: no token text).
    pub fn verify(&self, token: &str) -> Result<TokenGrant, AuthError> {
        // The header first, so a token of another algorithm is told apart from a forgery.
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Invalid)?;
        if header.alg != self.algorithm {
            return Err(AuthError::WrongAlgorithm);
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(
            |e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                    AuthError::WrongAlgorithm
                }
                _ => AuthError::Invalid,
            },
        )?;
        let claims = data.claims;
        #[allow(clippy::cast_precision_loss)] // ms since 1970 fit an f64's 52 bits exactly
        let now = crate::tick::now_ms() as f64 / 1000.0;
        #[allow(clippy::cast_precision_loss)]
        let leeway = self.leeway_secs as f64;
        if !claims.exp.is_finite() || claims.exp + leeway < now {
            return Err(AuthError::Expired);
        }
        match claims.nbf {
            None => {}
            Some(Some(nbf)) if nbf.is_finite() && nbf - leeway <= now => {}
            Some(Some(_)) => return Err(AuthError::NotYetValid),
            Some(None) => return Err(AuthError::BadClaims),
        }
        let patterns = |list: Option<Option<Vec<String>>>| -> Result<_, AuthError> {
            match list {
                None => Ok(None),
                Some(None) => Err(AuthError::BadClaims),
                Some(Some(list)) => Ok(SymbolPatterns::parse(&list, self.max_patterns)
                    .map_err(|e| {
                        tracing::debug!(error = %e, "token symbol claims refused");
                        AuthError::BadClaims
                    })?
                    .map(Arc::new)),
            }
        };
        Ok(TokenGrant {
            sub: claims
                .sub
                .map(|s| s.chars().take(MAX_SUB_CHARS).collect::<String>().into()),
            symbols: patterns(claims.symbols)?,
            ingest: claims.ingest,
            ingest_symbols: patterns(claims.ingest_symbols)?,
            // Finite and not in the past (checked above); `as` saturates.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            expires_at_ms: ((claims.exp + leeway) * 1000.0) as u64,
        })
    }
}

/// DER of the named-curve OIDs of an EC `PUBLIC KEY` (SPKI): P-256 (1.2.840.10045.3.1.7) and
/// P-384 (1.3.132.0.34).
const P256_OID: &[u8] = &[0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x03, 0x01, 0x07];
const P384_OID: &[u8] = &[0x06, 0x05, 0x2B, 0x81, 0x04, 0x00, 0x22];

/// The DER of a file that holds exactly one PEM block labelled `PUBLIC KEY` or
/// `RSA PUBLIC KEY`. `jsonwebtoken` also reads certificates (and some private keys) as
/// keys; a key file is the public key alone, so anything else is refused as a likely mix-up.
fn public_key_der(pem: &[u8]) -> Result<Vec<u8>, ConfigError> {
    use base64::Engine;
    let not_public = || {
        invalid(
            "auth.jwt_public_key_file: must hold one PEM public key (BEGIN PUBLIC KEY or BEGIN RSA PUBLIC KEY), not a private key or certificate".into(),
        )
    };
    let text = std::str::from_utf8(pem).map_err(|_| not_public())?;
    let mut labels = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("-----BEGIN "));
    let label = labels.next().ok_or_else(not_public)?;
    if labels.next().is_some() || !matches!(label, "PUBLIC KEY-----" | "RSA PUBLIC KEY-----") {
        return Err(not_public());
    }
    let body: String = text
        .lines()
        .map(str::trim)
        .skip_while(|l| !l.starts_with("-----BEGIN "))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END "))
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .map_err(|_| not_public())
}

/// The decoding key of a PEM public key and the algorithm it verifies: the configured one,
/// or the key type's usual one (RS256, ES256). An EC key's curve must be the algorithm's
/// (P-256 for ES256, P-384 for ES384).
fn public_key(pem: &[u8], configured: &str) -> Result<(DecodingKey, Algorithm), ConfigError> {
    let der = public_key_der(pem)?;
    let has = |oid: &[u8]| der.windows(oid.len()).any(|w| w == oid);
    let configured = match configured {
        "" => None,
        name => Some(name.parse::<Algorithm>().map_err(|_| {
            invalid(format!(
                "auth.jwt_algorithm: unknown algorithm {name:?} (RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384)"
            ))
        })?),
    };
    if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
        let alg = configured.unwrap_or(Algorithm::RS256);
        return match alg {
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => Ok((key, alg)),
            other => Err(invalid(format!(
                "auth.jwt_algorithm: {other:?} does not fit an RSA key"
            ))),
        };
    }
    if let Ok(key) = DecodingKey::from_ec_pem(pem) {
        let alg = configured.unwrap_or(Algorithm::ES256);
        return match alg {
            Algorithm::ES256 if has(P256_OID) => Ok((key, alg)),
            Algorithm::ES384 if has(P384_OID) => Ok((key, alg)),
            Algorithm::ES256 | Algorithm::ES384 => Err(invalid(format!(
                "auth.jwt_algorithm: {alg:?} needs a {} key (ES256: P-256, ES384: P-384)",
                if alg == Algorithm::ES256 {
                    "P-256"
                } else {
                    "P-384"
                }
            ))),
            other => Err(invalid(format!(
                "auth.jwt_algorithm: {other:?} does not fit an EC key"
            ))),
        };
    }
    Err(invalid(
        "auth.jwt_public_key_file: not a PEM RSA or EC public key".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(f: impl FnOnce(&mut AuthConfig)) -> AuthConfig {
        let mut c = AuthConfig::default();
        f(&mut c);
        c
    }

    #[test]
    fn unusable_settings_are_refused_at_start() {
        let short = with(|c| c.jwt_hs256_secret = Some("too-short".into()));
        assert!(JwtVerifier::from_config(&short).is_err());
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let file = dir.path().join("k.pem");
        std::fs::write(&file, key.public_key_pem()).unwrap();
        let both = with(|c| {
            c.jwt_hs256_secret = Some("x".repeat(32));
            c.jwt_public_key_file = Some(file.clone());
        });
        assert!(JwtVerifier::from_config(&both).is_err());
        let ec = with(|c| c.jwt_public_key_file = Some(file.clone()));
        let v = JwtVerifier::from_config(&ec).unwrap().unwrap();
        assert_eq!(
            v.algorithm(),
            Algorithm::ES256,
            "an EC key defaults to ES256"
        );
        let mismatch = with(|c| {
            c.jwt_public_key_file = Some(file.clone());
            c.jwt_algorithm = "RS256".into();
        });
        assert!(JwtVerifier::from_config(&mismatch).is_err());
        let garbage = dir.path().join("g.pem");
        std::fs::write(&garbage, "not a key").unwrap();
        let garbage = with(|c| c.jwt_public_key_file = Some(garbage.clone()));
        assert!(JwtVerifier::from_config(&garbage).is_err());
        let hs_other = with(|c| {
            c.jwt_hs256_secret = Some("x".repeat(32));
            c.jwt_algorithm = "HS512".into();
        });
        assert!(JwtVerifier::from_config(&hs_other).is_err());
        assert!(JwtVerifier::from_config(&AuthConfig::default())
            .unwrap()
            .is_none());
    }

    #[test]
    fn the_grant_reads_the_claims_and_the_leeway_extends_expiry() {
        let secret = "x".repeat(32);
        let v = JwtVerifier::from_config(&with(|c| c.jwt_hs256_secret = Some(secret.clone())))
            .unwrap()
            .unwrap();
        let exp = u64::try_from(crate::tick::now_ms() / 1000).unwrap() + 60;
        let claims = serde_json::json!({
            "exp": exp, "sub": "bob", "symbols": ["A*"], "ingest": true, "ingest_symbols": ["*"],
        });
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap();
        let g = v.verify(&token).unwrap();
        assert_eq!(g.sub.as_deref(), Some("bob"));
        assert!(g.symbols.as_ref().unwrap().allows("AB") && g.ingest);
        assert_eq!(g.ingest_symbols, None, "\"*\" is no limit");
        assert_eq!(g.expires_at_ms, (exp + 5) * 1000, "default leeway 5 s");
        let bad = serde_json::json!({"exp": exp, "symbols": ["A*B"]});
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &bad,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap();
        assert_eq!(v.verify(&token), Err(AuthError::BadClaims));
        assert_eq!(AuthError::BadClaims.reason(), "bad_claims");
        let v = JwtVerifier::from_config(&with(|c| {
            c.jwt_hs256_secret = Some(secret.clone());
            c.jwt_max_patterns = 2;
        }))
        .unwrap()
        .unwrap();
        let many = serde_json::json!({"exp": exp, "ingest_symbols": ["A", "B", "C"]});
        assert_eq!(v.verify(&sign(&secret, &many)), Err(AuthError::BadClaims));
    }

    fn hs_verifier(secret: &str) -> JwtVerifier {
        JwtVerifier::from_config(&with(|c| c.jwt_hs256_secret = Some(secret.into())))
            .unwrap()
            .unwrap()
    }

    fn sign(secret: &str, claims: &serde_json::Value) -> String {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            claims,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn a_null_symbol_list_is_refused_not_everything() {
        // Go's encoding/json writes a nil []string as null: a user with no entitlements.
        let secret = "x".repeat(32);
        let v = hs_verifier(&secret);
        let exp = u64::try_from(crate::tick::now_ms() / 1000).unwrap() + 60;
        for claim in ["symbols", "ingest_symbols"] {
            let mut c = serde_json::json!({"exp": exp, "ingest": true});
            c[claim] = serde_json::Value::Null;
            let verdict = v.verify(&sign(&secret, &c));
            assert_eq!(verdict, Err(AuthError::BadClaims), "{claim}: null");
        }
        let empty = serde_json::json!({"exp": exp, "symbols": []});
        let g = v.verify(&sign(&secret, &empty)).unwrap();
        assert!(!g.symbols.unwrap().allows("AAPL"), "[] permits nothing");
    }

    #[test]
    fn exp_and_nbf_are_numeric_dates_fractions_included() {
        let secret = "x".repeat(32);
        let v = JwtVerifier::from_config(&with(|c| {
            c.jwt_hs256_secret = Some(secret.clone());
            c.jwt_leeway_secs = 0;
        }))
        .unwrap()
        .unwrap();
        #[allow(clippy::cast_precision_loss)]
        let now = crate::tick::now_ms() as f64 / 1000.0;
        let ok = serde_json::json!({"exp": now + 60.5});
        let g = v
            .verify(&sign(&secret, &ok))
            .expect("a fractional exp is a NumericDate");
        assert!(g.expires_at_ms > 0);
        let early = serde_json::json!({"exp": now + 3600.0, "nbf": now + 600.5});
        assert_eq!(
            v.verify(&sign(&secret, &early)),
            Err(AuthError::NotYetValid),
            "a fractional nbf is honoured"
        );
        let past = serde_json::json!({"exp": now - 60.5});
        assert_eq!(v.verify(&sign(&secret, &past)), Err(AuthError::Expired));
        for bad in [
            serde_json::json!({"exp": now + 60.0, "nbf": "soon"}),
            serde_json::json!({"exp": "later"}),
            serde_json::json!({"exp": now + 60.0, "nbf": null}),
        ] {
            assert!(v.verify(&sign(&secret, &bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn key_files_that_are_not_a_fitting_public_key_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let p256 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&p256)
            .unwrap();
        let key = |path: std::path::PathBuf, alg: &str| {
            with(|c| {
                c.jwt_public_key_file = Some(path);
                c.jwt_algorithm = alg.into();
            })
        };
        let private = file("private.pem", &p256.serialize_pem());
        let certificate = file("cert.pem", &cert.pem());
        let p384_file = file("p384.pem", &p384.public_key_pem());
        for (what, config) in [
            ("a private key", key(private, "")),
            ("a certificate", key(certificate, "")),
            ("P-384 with ES256", key(p384_file.clone(), "")),
            ("P-384 with ES256 named", key(p384_file.clone(), "ES256")),
        ] {
            assert!(
                JwtVerifier::from_config(&config).is_err(),
                "{what} accepted"
            );
        }
        let v = JwtVerifier::from_config(&key(p384_file, "ES384"))
            .unwrap()
            .unwrap();
        assert_eq!(v.algorithm(), Algorithm::ES384);
        let p256_as_384 = key(file("p256.pem", &p256.public_key_pem()), "ES384");
        assert!(JwtVerifier::from_config(&p256_as_384).is_err());
        // JWT-only settings with no key would be silently ignored: refused instead.
        for config in [
            with(|c| c.jwt_algorithm = "RS256".into()),
            with(|c| c.jwt_audience = Some("tickfan".into())),
            with(|c| c.jwt_issuer = Some("https://id".into())),
        ] {
            assert!(JwtVerifier::from_config(&config).is_err(), "{config:?}");
        }
    }

    #[test]
    fn the_leeway_admits_a_little_clock_skew_and_no_more() {
        let secret = "x".repeat(32);
        let verifier = |leeway| {
            JwtVerifier::from_config(&with(|c| {
                c.jwt_hs256_secret = Some(secret.clone());
                c.jwt_leeway_secs = leeway;
            }))
            .unwrap()
            .unwrap()
        };
        let now = crate::tick::now_ms() / 1000;
        let just_expired = sign(&secret, &serde_json::json!({"exp": now - 30}));
        let almost_valid = sign(
            &secret,
            &serde_json::json!({"exp": now + 3600, "nbf": now + 30}),
        );
        let (strict, lenient) = (verifier(0), verifier(120));
        assert_eq!(strict.verify(&just_expired), Err(AuthError::Expired));
        assert_eq!(strict.verify(&almost_valid), Err(AuthError::NotYetValid));
        assert!(lenient.verify(&just_expired).is_ok());
        assert!(lenient.verify(&almost_valid).is_ok());
    }
}
