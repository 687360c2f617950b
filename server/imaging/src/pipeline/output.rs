//! Outputs that never look complete before they are: written as `NAME.partial`, made durable,
//! and only then renamed to `NAME`.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Why an output file could not be prepared or completed.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("{0} already exists; choose another name or pass --force to replace it")]
    Exists(PathBuf),
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Where the output `out` is written until it is complete: `OUT.partial` (`sda.vhdx` →
/// `sda.vhdx.partial`).
pub fn partial_path_for(out: &Path) -> PathBuf {
    let mut name = out.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

/// An output being written under its temporary name.
#[derive(Debug)]
pub struct PartialOutput {
    final_path: PathBuf,
    partial_path: PathBuf,
    file: File,
}

impl PartialOutput {
    /// Creates (or truncates) `OUT.partial`, refusing when `OUT` exists unless `overwrite`.
    /// Images hold whole disks, so the file is readable by its owner only (0600).
    pub fn create(final_path: &Path, overwrite: bool) -> Result<PartialOutput, OutputError> {
        if !overwrite && final_path.exists() {
            return Err(OutputError::Exists(final_path.to_path_buf()));
        }
        let partial_path = partial_path_for(final_path);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&partial_path)
            .map_err(|source| OutputError::Io {
                op: "create",
                path: partial_path.clone(),
                source,
            })?;
        Ok(PartialOutput {
            final_path: final_path.to_path_buf(),
            partial_path,
            file,
        })
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn partial_path(&self) -> &Path {
        &self.partial_path
    }

    /// Makes the data durable, renames to the final name, and makes the rename durable.
    pub fn commit(self) -> Result<PathBuf, OutputError> {
        let io = |op, path: &Path| {
            let path = path.to_path_buf();
            move |source| OutputError::Io { op, path, source }
        };
        self.file
            .sync_all()
            .map_err(io("sync", &self.partial_path))?;
        std::fs::rename(&self.partial_path, &self.final_path)
            .map_err(io("rename", &self.partial_path))?;
        let dir = match self.final_path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io("sync directory", &dir))?;
        Ok(self.final_path)
    }
}
