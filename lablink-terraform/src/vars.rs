//! The generated variables file, `terraform.tfvars.json`, which is also the record of the
//! desired VMs and their tokens between runs.
//!
//! It is written with `serde_json`, so every value reaches Terraform exactly as given: JSON
//! variable files are not templates, so quotes, `${...}`, `%{...}`, backslashes and newlines
//! stay literal (upstream interpolated values into HCL unescaped). It holds agent tokens, so
//! it is written with mode 0600 into a 0700 directory, through a temporary file and a rename.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use lablink_core::{AgentToken, Hostname};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::TfFailure;

/// The file Terraform loads automatically from the working directory.
pub(crate) const TFVARS_FILE: &str = "terraform.tfvars.json";

/// The module variable that carries the VMs (`hostname => { token }`).
pub(crate) const VMS_VARIABLE: &str = "vms";
/// The module variable that names the deployment (a tag on every resource).
pub(crate) const DEPLOYMENT_VARIABLE: &str = "deployment";

/// One VM in the `vms` map.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct VmEntry {
    pub token: AgentToken,
}

/// The desired VMs: hostname → entry. A `BTreeMap` keeps the file stable between runs.
pub(crate) type Desired = BTreeMap<Hostname, VmEntry>;

/// Writes the variables file: the extra variables, the deployment and the desired VMs.
pub(crate) fn write(
    dir: &Path,
    variables: &Map<String, Value>,
    deployment: &str,
    vms: &Desired,
) -> Result<(), TfFailure> {
    let mut all = variables.clone();
    all.insert(DEPLOYMENT_VARIABLE.into(), Value::String(deployment.into()));
    let vms: Map<String, Value> = vms
        .iter()
        .map(|(h, e)| {
            let mut entry = Map::new();
            entry.insert("token".into(), Value::String(e.token.expose().to_owned()));
            (h.to_string(), Value::Object(entry))
        })
        .collect();
    all.insert(VMS_VARIABLE.into(), Value::Object(vms));
    let text =
        serde_json::to_vec_pretty(&Value::Object(all)).expect("a JSON map always serializes");
    write_private(&dir.join(TFVARS_FILE), &text)
}

/// The VMs recorded in the variables file, or none when there is no file yet.
pub(crate) fn read_vms(dir: &Path) -> Result<Desired, TfFailure> {
    let path = dir.join(TFVARS_FILE);
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Desired::new()),
        Err(source) => {
            return Err(TfFailure::Files {
                what: "could not read the variables file",
                path,
                source,
            })
        }
    };
    #[derive(Deserialize)]
    struct File {
        #[serde(default)]
        vms: Desired,
    }
    serde_json::from_slice::<File>(&text)
        .map(|f| f.vms)
        .map_err(|e| TfFailure::Files {
            what: "the variables file is not valid",
            path,
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })
}

/// Writes `bytes` to `path` with mode 0600, atomically (temporary file, then rename).
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TfFailure> {
    let tmp = path.with_extension("tmp");
    let files = |what, path: &PathBuf| {
        let path = path.clone();
        move |source| TfFailure::Files { what, path, source }
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(files("could not create the variables file", &tmp))?;
    // `mode` applies only to new files; a leftover file keeps its mode otherwise.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(files("could not restrict the variables file", &tmp))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(files("could not write the variables file", &tmp))?;
    std::fs::rename(&tmp, path).map_err(files("could not replace the variables file", &tmp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_round_trips_tricky_values_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let tricky = "q\"uote ${var.x} %{if true}y%{endif} back\\slash\nnew line";
        let mut vars = Map::new();
        vars.insert("allocator_url".into(), Value::String(tricky.into()));
        let mut vms = Desired::new();
        vms.insert(
            "vm-1".parse().unwrap(),
            VmEntry {
                token: AgentToken::from(tricky.to_owned()),
            },
        );
        write(dir.path(), &vars, "dep", &vms).unwrap();
        let path = dir.path().join(TFVARS_FILE);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let json: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(json["allocator_url"], tricky);
        assert_eq!(json["deployment"], "dep");
        assert_eq!(json["vms"]["vm-1"]["token"], tricky);
        assert_eq!(read_vms(dir.path()).unwrap(), vms);
    }

    #[test]
    fn no_file_means_no_vms() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_vms(dir.path()).unwrap().is_empty());
    }
}
