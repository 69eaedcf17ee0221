//! The Terraform provisioner's settings as they appear in the allocator's configuration
//! file (`[provisioner] kind = "terraform"`): a serde struct with defaults, a `problems()`
//! check of the settings alone, and [`TerraformConfig::host_problems`], which looks at
//! the machine (the terraform binary, the module's variables and outputs).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::module::AWS_MODULE_FILES;
use crate::vars::{DEPLOYMENT_VARIABLE, VMS_VARIABLE};
use crate::{TerraformProvisionerBuilder, DEFAULT_TIMEOUT, MODULE_OUTPUTS, MODULE_VARIABLES};

/// `[provisioner] kind = "terraform"`: client VMs created by applying a Terraform module.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TerraformConfig {
    /// The module applied (empty: the shipped AWS client-VM module, embedded in the program).
    pub module_dir: Option<PathBuf>,
    /// Terraform's working directory: the module's copy, its variables (agent tokens, so it
    /// is kept private), the local state.
    pub working_dir: PathBuf,
    /// The terraform program (a name looked up on `PATH`, or a path).
    pub binary: PathBuf,
    /// Tags every resource, so one account can hold several deployments.
    pub deployment: String,
    /// The module's variables (`[provisioner.variables]`): for the shipped module
    /// `allocator_url`, `region`, `client_ami_id`, `machine_type`... `vms` and `deployment`
    /// are the provisioner's own.
    pub variables: Map<String, Value>,
    /// Where Terraform keeps its state (`[provisioner.state]`).
    pub state: StateBackend,
    /// Extra environment of every terraform run, e.g. `TF_CLI_CONFIG_FILE` or AWS settings.
    pub env: BTreeMap<String, String>,
    /// Longest one terraform run may take, seconds.
    pub timeout_seconds: u64,
    /// How long terraform waits for the state lock, seconds (0: it fails at once).
    pub lock_timeout_seconds: u64,
}

/// Where Terraform keeps its state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum StateBackend {
    /// A state file in the working directory.
    #[default]
    Local,
    /// An S3 object, locked with a lock file next to it (Terraform 1.10 and later).
    S3 {
        /// The bucket (it must exist).
        bucket: String,
        /// The state object's key, e.g. `lablink/workshop.tfstate`.
        key: String,
        /// The bucket's region.
        region: String,
    },
}

impl Default for TerraformConfig {
    fn default() -> Self {
        Self {
            module_dir: None,
            working_dir: PathBuf::from("lablink-terraform"),
            binary: PathBuf::from("terraform"),
            deployment: "lablink".into(),
            variables: Map::new(),
            state: StateBackend::Local,
            env: BTreeMap::new(),
            timeout_seconds: DEFAULT_TIMEOUT.as_secs(),
            lock_timeout_seconds: 0,
        }
    }
}

impl fmt::Debug for TerraformConfig {
    /// Variable and environment *names* only: their values may be secrets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TerraformConfig")
            .field("module_dir", &self.module_dir)
            .field("working_dir", &self.working_dir)
            .field("binary", &self.binary)
            .field("deployment", &self.deployment)
            .field("variables", &self.variables.keys().collect::<Vec<_>>())
            .field("state", &self.state)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("timeout_seconds", &self.timeout_seconds)
            .field("lock_timeout_seconds", &self.lock_timeout_seconds)
            .finish()
    }
}

impl TerraformConfig {
    /// The provisioner's builder with these settings (nothing runs yet).
    pub fn builder(&self) -> TerraformProvisionerBuilder {
        let mut b = TerraformProvisionerBuilder::new(&self.working_dir)
            .with_terraform_binary(&self.binary)
            .with_deployment(&self.deployment)
            .with_variables(self.variables.clone())
            .with_timeout(Duration::from_secs(self.timeout_seconds))
            .with_lock_timeout(Duration::from_secs(self.lock_timeout_seconds));
        if let Some(dir) = &self.module_dir {
            b = b.with_module_dir(dir);
        }
        for (name, value) in &self.env {
            b = b.with_env(name, value);
        }
        if let StateBackend::S3 {
            bucket,
            key,
            region,
        } = &self.state
        {
            let settings = [
                ("bucket", bucket.as_str()),
                ("key", key),
                ("region", region),
                ("use_lockfile", "true"),
            ];
            b = b.with_backend(
                "s3",
                settings
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            );
        }
        b
    }

    /// Every problem with these settings alone, one message each (empty when valid).
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.working_dir.as_os_str().is_empty() {
            problems.push("[provisioner] working_dir must be set".into());
        }
        if self.deployment.is_empty()
            || !self
                .deployment
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            problems.push(format!(
                "[provisioner] deployment {:?} must be letters, digits, '-', '_' or '.'",
                self.deployment
            ));
        }
        for reserved in [VMS_VARIABLE, DEPLOYMENT_VARIABLE] {
            if self.variables.contains_key(reserved) {
                problems.push(format!(
                    "[provisioner.variables] {reserved} is set by the provisioner; remove it"
                ));
            }
        }
        if self.timeout_seconds == 0 {
            problems.push("[provisioner] timeout_seconds must be positive".into());
        }
        if let StateBackend::S3 {
            bucket,
            key,
            region,
        } = &self.state
        {
            for (name, value) in [("bucket", bucket), ("key", key), ("region", region)] {
                if value.trim().is_empty() {
                    problems.push(format!("[provisioner.state] {name} must be set for s3"));
                }
            }
        }
        problems
    }

    /// What only the machine can tell, one message each: the terraform program is there,
    /// and the module declares the variables and outputs the provisioner relies on and every
    /// variable given, and a value is given for each variable without a default.
    pub fn host_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if find_program(&self.binary).is_none() {
            problems.push(format!(
                "[provisioner] binary: the terraform program {} was not found (install Terraform or set binary to its path)",
                self.binary.display()
            ));
        }
        let files = match &self.module_dir {
            None => Ok(AWS_MODULE_FILES
                .iter()
                .map(|(_, text)| (*text).to_owned())
                .collect()),
            Some(dir) => read_tf_files(dir),
        };
        match files {
            Err(problem) => problems.push(problem),
            Ok(files) => problems.extend(self.contract_problems(&Module::parse(&files))),
        }
        problems
    }

    fn contract_problems(&self, module: &Module) -> Vec<String> {
        let mut problems = Vec::new();
        let name = match &self.module_dir {
            None => "the shipped module".to_owned(),
            Some(dir) => format!("the module {}", dir.display()),
        };
        for variable in MODULE_VARIABLES {
            if !module.variables.contains_key(*variable) {
                problems.push(format!(
                    "[provisioner] {name} has no variable {variable:?}, which the provisioner sets"
                ));
            }
        }
        for output in MODULE_OUTPUTS {
            if !module.outputs.iter().any(|o| o == output) {
                problems.push(format!(
                    "[provisioner] {name} has no output {output:?}, which the provisioner reads"
                ));
            }
        }
        for given in self.variables.keys() {
            if !module.variables.contains_key(given) {
                problems.push(format!(
                    "[provisioner.variables] {given}: {name} has no such variable"
                ));
            }
        }
        for (variable, has_default) in &module.variables {
            let own = MODULE_VARIABLES.contains(&variable.as_str());
            if !has_default && !own && !self.variables.contains_key(variable) {
                problems.push(format!(
                    "[provisioner.variables] {variable} must be set: {name} has no default for it"
                ));
            }
        }
        problems
    }
}

/// `program` itself when it is a path, else the first match on `PATH`.
fn find_program(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return program.is_file().then(|| program.to_owned());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

fn read_tf_files(dir: &Path) -> Result<Vec<String>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        format!(
            "[provisioner] module_dir {}: cannot read it: {e}",
            dir.display()
        )
    })?;
    let mut files = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "tf") {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("[provisioner] {}: cannot read it: {e}", path.display()))?;
            files.push(text);
        }
    }
    if files.is_empty() {
        return Err(format!(
            "[provisioner] module_dir {} has no .tf files",
            dir.display()
        ));
    }
    Ok(files)
}

/// The variables (name => has a default) and outputs a module declares, read from its
/// top-level blocks.
#[derive(Debug, Default)]
struct Module {
    variables: BTreeMap<String, bool>,
    outputs: Vec<String>,
}

impl Module {
    fn parse(files: &[String]) -> Self {
        let mut module = Self::default();
        for text in files {
            let mut lines = text.lines();
            while let Some(line) = lines.next() {
                let words: Vec<&str> = line.split_whitespace().collect();
                let (Some(kind), Some(name)) = (words.first(), words.get(1)) else {
                    continue;
                };
                let name = name.trim_matches('"').to_owned();
                match *kind {
                    "output" => module.outputs.push(name),
                    "variable" => {
                        // The block's own lines, up to its closing brace (a one-line block
                        // such as `variable "x" { default = 1 }` closes on its own line).
                        let braces = |l: &str| {
                            l.matches('{').count() as isize - l.matches('}').count() as isize
                        };
                        let mut depth = braces(line);
                        let mut has_default = depth <= 0 && line.contains("default");
                        while depth > 0 {
                            let Some(inner) = lines.next() else { break };
                            if depth == 1 && inner.trim_start().starts_with("default") {
                                has_default = true;
                            }
                            depth += braces(inner);
                        }
                        module.variables.insert(name, has_default);
                    }
                    _ => {}
                }
            }
        }
        module
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_module_meets_the_contract_once_its_required_variables_are_given() {
        let files: Vec<String> = AWS_MODULE_FILES
            .iter()
            .map(|(_, t)| (*t).to_owned())
            .collect();
        let module = Module::parse(&files);
        assert_eq!(module.variables.get("vms"), Some(&true), "{module:?}");
        let mut config = TerraformConfig::default();
        let problems = config.contract_problems(&module);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("allocator_url"), "{problems:?}");
        config
            .variables
            .insert("allocator_url".into(), "https://lablink.example.org".into());
        assert!(config.contract_problems(&module).is_empty());
        config.variables.insert("regoin".into(), "us-east-1".into());
        config.variables.insert("vms".into(), Value::Null);
        let mut problems = config.contract_problems(&module);
        problems.extend(config.problems());
        assert!(
            problems
                .iter()
                .any(|p| p.contains("regoin: the shipped module has no such variable")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("vms is set by the provisioner")),
            "{problems:?}"
        );
    }

    #[test]
    fn one_line_variable_blocks_are_read_whole() {
        let module = Module::parse(&[
            "variable \"a\" { default = 1 }\nvariable \"b\" {}\nvariable \"c\" {\n  type = string\n}\n".into(),
        ]);
        let found: Vec<(&str, bool)> = module
            .variables
            .iter()
            .map(|(k, v)| (k.as_str(), *v))
            .collect();
        assert_eq!(found, [("a", true), ("b", false), ("c", false)]);
    }

    #[test]
    fn a_module_missing_the_contract_is_named_in_full() {
        let module = Module::parse(&["variable \"deployment\" {\n  type = string\n}\noutput \"vm_instance_ids\" {\n  value = {}\n}\n".into()]);
        let config = TerraformConfig {
            module_dir: Some("/m".into()),
            ..TerraformConfig::default()
        };
        let problems = config.contract_problems(&module);
        assert!(
            problems.iter().any(|p| p.contains("no variable \"vms\"")),
            "{problems:?}"
        );
        assert!(
            !problems
                .iter()
                .any(|p| p.contains("deployment") && p.contains("no default")),
            "{problems:?}"
        );
        assert_eq!(
            problems.iter().filter(|p| p.contains("no output")).count(),
            MODULE_OUTPUTS.len() - 1,
            "{problems:?}"
        );
    }
}
