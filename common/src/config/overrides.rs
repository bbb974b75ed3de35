//! Configuration layering (ripgrep's LowArgs → HiArgs idea): the YAML file, then
//! `STACKWISE_<SECTION>__<KEY>=value` environment variables, then `--set section.key=value`
//! flags, all applied to the raw YAML tree before it is deserialized and validated.

use serde_yaml::{Mapping, Value};

#[derive(Debug, thiserror::Error)]
pub enum OverrideError {
    #[error("override {0:?}: expected key=value, e.g. training.lr=3e-4")]
    Syntax(String),
    #[error("override {key}: {parent} is not a section")]
    NotASection { key: String, parent: String },
}

/// Set `a.b.c = value` in `root` (creating sections). The value is parsed as YAML, so
/// `1e-3`, `true`, `[0.1, 0.2]` and plain strings all work.
pub fn set_path(root: &mut Value, dotted: &str, raw_value: &str) -> Result<(), OverrideError> {
    let value: Value =
        serde_yaml::from_str(raw_value).unwrap_or_else(|_| Value::String(raw_value.to_string()));
    let parts: Vec<&str> = dotted.split('.').filter(|p| !p.is_empty()).collect();
    if parts.is_empty() {
        return Err(OverrideError::Syntax(dotted.to_string()));
    }
    let mut node = root;
    for (i, part) in parts.iter().enumerate() {
        if node.is_null() {
            *node = Value::Mapping(Mapping::new());
        }
        let Value::Mapping(map) = node else {
            return Err(OverrideError::NotASection {
                key: dotted.to_string(),
                parent: parts[..i].join("."),
            });
        };
        let key = Value::String(part.to_string());
        if i == parts.len() - 1 {
            map.insert(key, value);
            return Ok(());
        }
        node = map.entry(key).or_insert(Value::Null);
    }
    unreachable!("the loop returns on the last part")
}

/// `key=value` pairs from `--set`.
pub fn apply_sets(root: &mut Value, sets: &[String]) -> Result<(), OverrideError> {
    for s in sets {
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| OverrideError::Syntax(s.clone()))?;
        set_path(root, k.trim(), v.trim())?;
    }
    Ok(())
}

/// The config's top-level keys that hold a value, not a section (`STACKWISE_INIT_FROM`).
const TOP_LEVEL_KEYS: &[&str] = &["init_from"];

/// `STACKWISE_TRAINING__LR=1e-3` → `training.lr = 1e-3` (double underscore separates
/// sections; keys are lower-cased). Variables that are CLI settings, not config keys, are
/// skipped.
pub fn apply_env<I: IntoIterator<Item = (String, String)>>(
    root: &mut Value,
    vars: I,
) -> Result<Vec<String>, OverrideError> {
    let mut applied = Vec::new();
    for (k, v) in vars {
        let Some(rest) = k.strip_prefix("STACKWISE_") else {
            continue;
        };
        // Top-level keys are few; other single-word variables (STACKWISE_LOG, _TOKEN) are
        // settings of the CLI, not config keys.
        if !rest.contains("__") && !TOP_LEVEL_KEYS.contains(&rest.to_lowercase().as_str()) {
            continue;
        }
        let dotted = rest
            .split("__")
            .map(|p| p.to_lowercase())
            .collect::<Vec<_>>()
            .join(".");
        set_path(root, &dotted, &v)?;
        applied.push(dotted);
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_then_set_override_nested_keys() {
        let mut v: Value =
            serde_yaml::from_str("training:\n  lr: 0.1\n  steps: 5\nmodel:\n  d_model: 64\n")
                .unwrap();
        let env = vec![
            ("STACKWISE_TRAINING__LR".to_string(), "0.5".to_string()),
            ("STACKWISE_MODEL__N_HEADS".to_string(), "8".to_string()),
            ("STACKWISE_LOG".to_string(), "debug".to_string()),
            ("STACKWISE_INIT_FROM".to_string(), "base/".to_string()),
            ("HOME".to_string(), "/root".to_string()),
        ];
        assert_eq!(
            apply_env(&mut v, env).unwrap(),
            vec!["training.lr", "model.n_heads", "init_from"]
        );
        apply_sets(
            &mut v,
            &["training.lr=1e-3".into(), "data.path=some/where".into()],
        )
        .unwrap();
        assert_eq!(v["training"]["lr"].as_f64(), Some(1e-3));
        assert_eq!(v["training"]["steps"].as_u64(), Some(5));
        assert_eq!(v["model"]["n_heads"].as_u64(), Some(8));
        assert_eq!(v["data"]["path"].as_str(), Some("some/where"));
        assert_eq!(v["init_from"].as_str(), Some("base/"));
        assert!(apply_sets(&mut v, &["novalue".into()]).is_err());
        assert!(apply_sets(&mut v, &["training.lr.x=1".into()]).is_err());
    }
}
