//! Reading the configuration: a TOML or YAML file as a value tree, `LABLINK_*` variables
//! laid over it with the types of the settings they name, and each section deserialized on
//! its own so that every problem is reported.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// Reads a file as a JSON value tree (TOML by default, YAML for `.yaml`/`.yml`).
pub(super) fn read_file(path: &Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    let yaml = matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    );
    let value: Value = if yaml {
        serde_yaml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?
    } else {
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?
    };
    match value {
        Value::Null => Ok(Value::Object(Map::new())),
        v @ Value::Object(_) => Ok(v),
        _ => Err(format!("{}: the top level must be a table", path.display())),
    }
}

/// Sets `path` in `tree` from an environment value, typed like the default at that path.
/// Path segments name settings in lower case; keys inside a free-form table (one whose
/// default is empty, like the Terraform module's variables) keep the case they are given
/// in. A list is given as a JSON array or comma-separated.
pub(super) fn overlay(
    tree: &mut Value,
    defaults: &Value,
    var: &str,
    path: &[&str],
    raw: &str,
) -> Result<(), String> {
    let mut default = defaults;
    let mut keys: Vec<String> = Vec::new();
    for key in path {
        let lower = key.to_lowercase();
        match default.get(&lower) {
            Some(inner) => {
                default = inner;
                keys.push(lower);
            }
            // A free-form table: the rest names its key.
            None if default.as_object().is_some_and(Map::is_empty) && !keys.is_empty() => {
                keys.push(path[keys.len()..].join("__"));
                default = &Value::Null;
                break;
            }
            None => {
                let lower: Vec<String> = path.iter().map(|k| k.to_lowercase()).collect();
                return Err(format!("{var}: there is no setting {}", lower.join(".")));
            }
        }
    }
    let value = match default {
        Value::Bool(_) => Value::Bool(
            raw.parse()
                .map_err(|_| format!("{var}: expected true or false"))?,
        ),
        Value::Number(_) => {
            let n: f64 = raw
                .parse()
                .map_err(|_| format!("{var}: expected a number"))?;
            serde_json::from_str(raw.trim())
                .ok()
                .filter(Value::is_number)
                .unwrap_or_else(|| serde_json::json!(n))
        }
        Value::Array(_) => match serde_json::from_str::<Value>(raw) {
            Ok(list @ Value::Array(_)) => list,
            _ => Value::Array(
                raw.split(',')
                    .map(str::trim)
                    .filter(|v| !v.is_empty())
                    .map(|v| Value::String(v.to_owned()))
                    .collect(),
            ),
        },
        Value::Object(_) => {
            return Err(format!(
                "{var}: {} is a section, not a value",
                keys.join(".")
            ))
        }
        _ => Value::String(raw.to_owned()),
    };
    let mut node = tree;
    for key in &keys[..keys.len() - 1] {
        let map = node
            .as_object_mut()
            .ok_or_else(|| format!("{var}: {key} is not a section in the file"))?;
        node = map
            .entry(key.clone())
            .or_insert_with(|| Value::Object(Map::new()));
    }
    node.as_object_mut()
        .ok_or_else(|| format!("{var}: its parent is not a section in the file"))?
        .insert(keys[keys.len() - 1].clone(), value);
    Ok(())
}

pub(super) fn section<T: DeserializeOwned + Default>(
    tree: &Value,
    name: &str,
    problems: &mut Vec<String>,
) -> T {
    match tree.get(name) {
        None => T::default(),
        Some(v) => serde_json::from_value(v.clone()).unwrap_or_else(|e| {
            problems.push(format!("[{name}] {e}"));
            T::default()
        }),
    }
}
