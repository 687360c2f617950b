//! Outputs that never look complete before they are: written as `NAME.partial`, made durable,
//! and only then renamed to `NAME`.
//!
//! `NAME.partial` is created exclusively (`O_CREAT | O_EXCL`), never truncated: two writers to
//! the same name cannot share one file, so the second fails with [`OutputError::InUse`]
//! instead of interleaving its blocks with the first's.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Why an output file could not be prepared or completed.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("{0} already exists; choose another name or pass --force to replace it")]
    Exists(PathBuf),
    /// `NAME.partial` exists: another job is writing it, or one that stopped left it behind.
    #[error(
        "another job is already writing {out} or a stale {partial} exists; remove it if no job is \
         running"
    )]
    InUse { out: PathBuf, partial: PathBuf },
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
    /// Creates `OUT.partial` (it must not exist), refusing when `OUT` exists unless
    /// `overwrite`. Images hold whole disks, so the file is readable by its owner only (0600).
    pub fn create(final_path: &Path, overwrite: bool) -> Result<PartialOutput, OutputError> {
        if !overwrite && final_path.exists() {
            return Err(OutputError::Exists(final_path.to_path_buf()));
        }
        let partial_path = partial_path_for(final_path);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&partial_path)
            .map_err(|source| match source.kind() {
                std::io::ErrorKind::AlreadyExists => OutputError::InUse {
                    out: final_path.to_path_buf(),
                    partial: partial_path.clone(),
                },
                _ => OutputError::Io {
                    op: "create",
                    path: partial_path.clone(),
                    source,
                },
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

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    /// Two writers to one name: the second is refused and the first's bytes are untouched
    /// (the old code truncated the first writer's file under it).
    #[test]
    fn a_second_writer_to_the_same_name_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("dup.qcow2");
        let first = PartialOutput::create(&out, false).unwrap();
        first.file().write_all(b"first writer's data").unwrap();
        match PartialOutput::create(&out, false) {
            Err(OutputError::InUse { out: o, partial }) => {
                assert_eq!(o, out);
                assert_eq!(partial, dir.path().join("dup.qcow2.partial"));
            }
            other => panic!("second writer not refused: {other:?}"),
        }
        let err = PartialOutput::create(&out, true).unwrap_err().to_string();
        assert!(err.contains("dup.qcow2.partial"), "{err}");
        assert_eq!(
            std::fs::read(first.partial_path()).unwrap(),
            b"first writer's data"
        );
        assert_eq!(first.commit().unwrap(), out);
        assert_eq!(std::fs::read(&out).unwrap(), b"first writer's data");
        // Once committed, the name is free again for a writer that may replace it.
        PartialOutput::create(&out, true).unwrap();
    }
}
