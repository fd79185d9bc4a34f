//! Every file in config/ parses and validates; the reference config equals the built-in
//! defaults, so the documentation cannot drift from the code.

use tickfan::Config;

#[test]
fn every_config_file_parses() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/config");
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            Config::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            seen += 1;
        }
    }
    assert!(
        seen >= 3,
        "config/ should hold default, dev and loadtest configs"
    );
}

#[test]
fn default_toml_documents_the_defaults() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.toml");
    let parsed = Config::load(std::path::Path::new(path)).unwrap();
    assert_eq!(parsed, Config::default());
    // Every key is present (not just defaulted): serializing the defaults yields no key the
    // file lacks.
    let text = std::fs::read_to_string(path).unwrap();
    let file: toml::Table = text.parse().unwrap();
    let defaults: toml::Table = toml::Table::try_from(Config::default()).unwrap();
    for (section, keys) in &defaults {
        let keys = keys.as_table().unwrap();
        let in_file = file
            .get(section)
            .and_then(|v| v.as_table())
            .unwrap_or_else(|| panic!("[{section}] missing"));
        for key in keys.keys() {
            assert!(
                in_file.contains_key(key),
                "{section}.{key} missing from config/default.toml"
            );
        }
    }
}

#[test]
fn empty_config_is_the_default_and_unknown_keys_fail() {
    assert_eq!(Config::from_toml("").unwrap(), Config::default());
    let err = Config::from_toml("[queue]\ncapacityy = 1")
        .unwrap_err()
        .to_string();
    assert!(err.contains("capacityy"), "{err}");
    let err = Config::from_toml("[nope]\n").unwrap_err().to_string();
    assert!(err.contains("nope"), "{err}");
    assert!(Config::from_toml("[queue]\ncapacity = 0").is_err());
}

#[test]
fn serializing_the_config_never_carries_a_secret() {
    let mut config = Config::default();
    config.auth.client_tokens = vec!["client-secret-token".into()];
    config.auth.ingest_tokens = vec!["ingest-secret-token".into()];
    config.auth.jwt_hs256_secret = Some("an-hs256-secret-of-at-least-32-bytes!".into());
    let json = serde_json::to_string(&config).unwrap();
    for secret in [
        "client-secret-token",
        "ingest-secret-token",
        "an-hs256-secret",
    ] {
        assert!(!json.contains(secret), "{secret} in {json}");
    }
    assert!(
        json.contains(r#""jwt_hs256_secret":"[redacted]""#),
        "{json}"
    );
    let unset = serde_json::to_string(&Config::default()).unwrap();
    assert!(unset.contains(r#""jwt_hs256_secret":null"#), "{unset}");
}
