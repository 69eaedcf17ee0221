//! The Terraform module a provisioner applies: the shipped AWS module (embedded in the
//! binary) or a directory, copied into the working directory.

use std::path::{Path, PathBuf};

use crate::error::TfFailure;
use crate::vars::write_private;

/// The files of the shipped AWS client-VM module (`terraform/aws/` in this crate).
pub const AWS_MODULE_FILES: &[(&str, &str)] = &[
    ("versions.tf", include_str!("../terraform/aws/versions.tf")),
    (
        "variables.tf",
        include_str!("../terraform/aws/variables.tf"),
    ),
    ("main.tf", include_str!("../terraform/aws/main.tf")),
    ("outputs.tf", include_str!("../terraform/aws/outputs.tf")),
    (
        "user_data.sh.tftpl",
        include_str!("../terraform/aws/user_data.sh.tftpl"),
    ),
];

/// Lists the module files copied last time, so that files a module no longer has are removed.
const MANIFEST: &str = ".lablink-module-files";

/// Where the module comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ModuleSource {
    /// The shipped AWS module.
    Aws,
    /// A module directory on disk.
    Dir(PathBuf),
}

impl ModuleSource {
    /// Copies the module's files into `dir`, replacing those copied last time. Terraform's
    /// own files (`.terraform/`, state, variables) are never copied.
    pub(crate) fn install(&self, dir: &Path) -> Result<(), TfFailure> {
        let files: Vec<(PathBuf, Vec<u8>)> = match self {
            Self::Aws => AWS_MODULE_FILES
                .iter()
                .map(|(name, text)| (PathBuf::from(name), text.as_bytes().to_vec()))
                .collect(),
            Self::Dir(src) => {
                let mut files = Vec::new();
                collect(src, Path::new(""), &mut files)?;
                if !files
                    .iter()
                    .any(|(p, _)| p.extension().is_some_and(|e| e == "tf"))
                {
                    return Err(TfFailure::Config(format!(
                        "the module directory {} has no .tf files",
                        src.display()
                    )));
                }
                files
            }
        };
        let manifest = dir.join(MANIFEST);
        if let Ok(old) = std::fs::read_to_string(&manifest) {
            for name in old.lines().filter(|l| !l.is_empty() && !l.contains("..")) {
                let _ = std::fs::remove_file(dir.join(name));
            }
        }
        for (name, bytes) in &files {
            let path = dir.join(name);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|source| TfFailure::Files {
                    what: "could not create a module directory",
                    path: parent.to_owned(),
                    source,
                })?;
            }
            std::fs::write(&path, bytes).map_err(|source| TfFailure::Files {
                what: "could not copy a module file",
                path,
                source,
            })?;
        }
        let names: Vec<String> = files
            .iter()
            .map(|(p, _)| p.to_string_lossy().into_owned())
            .collect();
        write_private(&manifest, names.join("\n").as_bytes())
    }
}

/// Files Terraform manages itself in a working directory; never copied from a module.
fn is_terraforms_own(name: &str) -> bool {
    name.starts_with(".terraform")
        || name.starts_with("terraform.tfstate")
        || name.starts_with("terraform.tfvars")
        || name.ends_with(".tfstate")
        || name.ends_with(".tfstate.backup")
        || name == MANIFEST
}

fn collect(root: &Path, rel: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) -> Result<(), TfFailure> {
    let dir = root.join(rel);
    let read_err = |path: &Path| {
        let path = path.to_owned();
        move |source| TfFailure::Files {
            what: "could not read the module directory",
            path,
            source,
        }
    };
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .map_err(read_err(&dir))?
        .collect::<Result<_, _>>()
        .map_err(read_err(&dir))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_terraforms_own(&name) {
            continue;
        }
        let path = entry.path();
        let file_type = entry.file_type().map_err(read_err(&path))?;
        if file_type.is_dir() {
            collect(root, &rel.join(&name), out)?;
        } else {
            let bytes = std::fs::read(&path).map_err(read_err(&path))?;
            out.push((rel.join(&name), bytes));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_module_directory_is_copied_without_terraforms_own_files() {
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("main.tf"), "# main").unwrap();
        std::fs::write(src.path().join("old.tf"), "# old").unwrap();
        std::fs::write(src.path().join("terraform.tfstate"), "{}").unwrap();
        std::fs::create_dir(src.path().join("templates")).unwrap();
        std::fs::write(src.path().join("templates/x.tftpl"), "x").unwrap();
        let dest = tempfile::tempdir().unwrap();
        let source = ModuleSource::Dir(src.path().to_owned());
        source.install(dest.path()).unwrap();
        assert!(dest.path().join("main.tf").exists());
        assert!(dest.path().join("templates/x.tftpl").exists());
        assert!(!dest.path().join("terraform.tfstate").exists());

        std::fs::remove_file(src.path().join("old.tf")).unwrap();
        source.install(dest.path()).unwrap();
        assert!(!dest.path().join("old.tf").exists(), "a removed file goes");
        assert!(dest.path().join("main.tf").exists());
    }

    #[test]
    fn a_directory_without_terraform_files_is_rejected() {
        let src = tempfile::tempdir().unwrap();
        let dest = tempfile::tempdir().unwrap();
        let err = ModuleSource::Dir(src.path().to_owned())
            .install(dest.path())
            .unwrap_err();
        assert!(err.to_string().contains("no .tf files"), "{err}");
    }

    #[test]
    fn the_aws_module_installs() {
        let dest = tempfile::tempdir().unwrap();
        ModuleSource::Aws.install(dest.path()).unwrap();
        for (name, _) in AWS_MODULE_FILES {
            assert!(dest.path().join(name).exists(), "{name}");
        }
    }
}
