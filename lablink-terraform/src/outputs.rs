//! Reads the machines in Terraform's state from `terraform output -json`.
//!
//! The module contract: `vm_instance_ids` maps each hostname to its instance id, and only
//! machines that really exist have one (after a failed apply, Terraform may still list
//! planned names in other outputs, so ids are the inventory). `vm_public_ips` and
//! `vm_private_ips` map hostnames to addresses; `vm_tokens` (sensitive) maps hostnames to the
//! tokens in state, so that existing machines keep theirs even if the variables file is lost.
//! `vm_instance_types`, when the module declares it, maps hostnames to instance types (the
//! key of the cost estimate's price table).

use std::collections::BTreeMap;

use lablink_core::{AgentToken, Hostname, InstanceId, ProvisionedVm};
use serde_json::Value;

use crate::error::TfFailure;

/// Output that maps hostnames to instance ids: the inventory.
pub(crate) const INSTANCE_IDS: &str = "vm_instance_ids";
/// Output that maps hostnames to public addresses.
pub(crate) const PUBLIC_IPS: &str = "vm_public_ips";
/// Output that maps hostnames to private addresses.
pub(crate) const PRIVATE_IPS: &str = "vm_private_ips";
/// Sensitive output that maps hostnames to their agent tokens.
pub(crate) const TOKENS: &str = "vm_tokens";
/// Optional: hostname → instance type (the cost estimate's key); a module without it gives
/// machines of no known type.
pub(crate) const INSTANCE_TYPES: &str = "vm_instance_types";

/// One machine in Terraform's state.
#[derive(Debug, Clone)]
pub(crate) struct Machine {
    pub vm: ProvisionedVm,
    pub token: Option<AgentToken>,
}

/// The machines in state, by hostname.
pub(crate) type Inventory = BTreeMap<Hostname, Machine>;

/// Parses the JSON printed by `terraform output -json`. No outputs at all (a fresh working
/// directory) is an empty inventory. `None` means the outputs are stale: there are outputs
/// but no `vm_instance_ids`, which is what a failed apply leaves when the ids were unknown.
pub(crate) fn parse(json: &str) -> Result<Option<Inventory>, TfFailure> {
    let json = json.trim();
    if json.is_empty() {
        return Ok(Some(Inventory::new()));
    }
    let outputs: serde_json::Map<String, Value> = serde_json::from_str(json)
        .map_err(|e| TfFailure::Outputs(format!("`terraform output -json` is not JSON: {e}")))?;
    let value = |name: &str| outputs.get(name).and_then(|o| o.get("value"));
    let strings = |name: &str| -> Result<BTreeMap<String, String>, TfFailure> {
        match value(name) {
            None | Some(Value::Null) => Ok(BTreeMap::new()),
            Some(Value::Object(map)) => Ok(map
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()),
            Some(other) => Err(TfFailure::Outputs(format!(
                "`{name}` must map hostnames to strings, found {}",
                kind(other)
            ))),
        }
    };
    if !outputs.is_empty() && value(INSTANCE_IDS).is_none() {
        return Ok(None);
    }
    let ids = strings(INSTANCE_IDS)?;
    let public = strings(PUBLIC_IPS)?;
    let private = strings(PRIVATE_IPS)?;
    let mut tokens = strings(TOKENS)?;
    let mut types = strings(INSTANCE_TYPES)?;
    let mut inventory = Inventory::new();
    for (name, id) in ids {
        let (Ok(hostname), Ok(instance_id)) = (name.parse::<Hostname>(), id.parse::<InstanceId>())
        else {
            tracing::warn!(hostname = %name, "ignoring a machine with an invalid hostname or id in the outputs");
            continue;
        };
        let address = public
            .get(&name)
            .or_else(|| private.get(&name))
            .filter(|a| !a.is_empty())
            .cloned();
        let token = tokens.remove(&name).map(AgentToken::from);
        inventory.insert(
            hostname.clone(),
            Machine {
                vm: ProvisionedVm {
                    hostname,
                    instance_id,
                    address,
                    instance_type: types.remove(&name).filter(|t| !t.is_empty()),
                },
                token,
            },
        );
    }
    Ok(Some(inventory))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a bool",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a map",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machines_come_from_instance_ids_with_public_then_private_addresses() {
        let json = r#"{
          "vm_instance_names": {"sensitive": false, "value": ["a", "b", "planned"]},
          "vm_instance_ids": {"sensitive": false, "value": {"a": "i-1", "b": "i-2"}},
          "vm_public_ips": {"sensitive": false, "value": {"a": "1.2.3.4", "b": null}},
          "vm_private_ips": {"sensitive": false, "value": {"a": "10.0.0.1", "b": "10.0.0.2"}},
          "vm_tokens": {"sensitive": true, "value": {"a": "tok-a"}}
        }"#;
        let inv = parse(json).unwrap().unwrap();
        assert_eq!(inv.len(), 2, "only machines with an id exist");
        let a = &inv[&"a".parse::<Hostname>().unwrap()];
        assert_eq!(a.vm.instance_id.as_str(), "i-1");
        assert_eq!(a.vm.address.as_deref(), Some("1.2.3.4"));
        assert_eq!(a.token.as_ref().unwrap().expose(), "tok-a");
        let b = &inv[&"b".parse::<Hostname>().unwrap()];
        assert_eq!(b.vm.address.as_deref(), Some("10.0.0.2"));
        assert!(b.token.is_none());
    }

    #[test]
    fn no_outputs_is_empty_missing_ids_are_stale_and_wrong_types_are_errors() {
        assert!(parse("").unwrap().unwrap().is_empty());
        assert!(parse("{}").unwrap().unwrap().is_empty());
        assert!(
            parse(r#"{"other": {"value": 1}}"#).unwrap().is_none(),
            "stale"
        );
        assert!(parse(r#"{"vm_instance_ids": {"value": ["i-1"]}}"#).is_err());
        assert!(parse("not json").is_err());
    }
}
