//! Cost of verifying a JWT, which every connection, HTTP request and token refresh that
//! carries one pays once (`Verifier::check`: header, signature, claims, symbol patterns).
//! HS256 with a 46-byte secret and ES256 with a P-256 key made here by rcgen; both tokens
//! carry a `symbols` claim of three patterns. For comparison, a static token check.
//! Results: docs/benchmarks.md, "JWT verification".

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use tickfan::auth::{Role, Verifier};
use tickfan::config::AuthConfig;

const SECRET: &str = "a-bench-only-hs256-secret-of-at-least-32-bytes";

fn claims() -> serde_json::Value {
    let exp = tickfan::tick::now_ms() / 1000 + 3600;
    serde_json::json!({"sub": "bench-user", "exp": exp, "symbols": ["AAPL", "BTC*", "ETH*"]})
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("jwt_verify");

    let hs = Verifier::new(&AuthConfig {
        jwt_hs256_secret: Some(SECRET.into()),
        ..AuthConfig::default()
    })
    .unwrap();
    let token = encode(
        &Header::new(Algorithm::HS256),
        &claims(),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    assert!(hs.check(Role::Client, Some(&token)).is_ok());
    group.bench_function("hs256", |b| {
        b.iter(|| hs.check(Role::Client, Some(black_box(&token))));
    });

    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let public = dir.path().join("jwt.pub.pem");
    std::fs::write(&public, key.public_key_pem()).unwrap();
    let es = Verifier::new(&AuthConfig {
        jwt_public_key_file: Some(public),
        ..AuthConfig::default()
    })
    .unwrap();
    let token = encode(
        &Header::new(Algorithm::ES256),
        &claims(),
        &EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap(),
    )
    .unwrap();
    assert!(es.check(Role::Client, Some(&token)).is_ok());
    group.bench_function("es256", |b| {
        b.iter(|| es.check(Role::Client, Some(black_box(&token))));
    });

    let statics = Verifier::new(&AuthConfig {
        client_tokens: vec!["a-static-client-token-of-some-length".into()],
        ..AuthConfig::default()
    })
    .unwrap();
    group.bench_function("static_token", |b| {
        b.iter(|| {
            statics.check(
                Role::Client,
                Some(black_box("a-static-client-token-of-some-length")),
            )
        });
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
