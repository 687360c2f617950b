//! Paths inside a partition, as requests name them. A path always starts at the partition's
//! root (a leading `/` is optional); it can never name anything outside it: `..` components,
//! NUL bytes and over-long paths are refused here (400), and symbolic links whose targets climb
//! above the root are refused when resolved (`Filesystem::resolve_within`).

use crate::error::Failure;

/// Longest path accepted, in bytes (Linux's PATH_MAX).
pub const MAX_PATH: usize = 4096;

/// A checked path: `/`-separated components, none of them empty, `.` or `..`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InnerPath(Vec<String>);

impl InnerPath {
    /// Checks a path from a request (already percent-decoded).
    pub fn parse(raw: &str) -> Result<InnerPath, Failure> {
        if raw.len() > MAX_PATH {
            return Err(Failure::bad_request(format!(
                "path is longer than {MAX_PATH} bytes"
            )));
        }
        if raw.contains('\0') {
            return Err(Failure::bad_request("path contains a NUL byte"));
        }
        let mut parts = Vec::new();
        for part in raw.split('/') {
            match part {
                "" | "." => {}
                ".." => {
                    return Err(Failure::bad_request(
                        "path may not contain `..`: paths start at the partition's root and stay inside it",
                    ))
                }
                p => parts.push(p.to_string()),
            }
        }
        Ok(InnerPath(parts))
    }

    /// The root of the partition.
    pub fn root() -> InnerPath {
        InnerPath(Vec::new())
    }

    /// `/a/b` form.
    pub fn as_string(&self) -> String {
        format!("/{}", self.0.join("/"))
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    pub fn components(&self) -> &[String] {
        &self.0
    }

    /// The last component, or "/" for the root.
    pub fn file_name(&self) -> &str {
        self.0.last().map_or("/", String::as_str)
    }

    /// The directory holding this path (the root's parent is the root).
    pub fn parent(&self) -> InnerPath {
        let mut p = self.0.clone();
        p.pop();
        InnerPath(p)
    }

    /// This path with one more component (a name read from a directory).
    pub fn join(&self, name: &str) -> InnerPath {
        let mut p = self.0.clone();
        p.push(name.to_string());
        InnerPath(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_could_leave() {
        for bad in ["..", "/..", "/a/../..", "a/..", "/a/b/../../../etc", "x\0y"] {
            assert!(InnerPath::parse(bad).is_err(), "{bad:?}");
        }
        assert!(InnerPath::parse(&"a/".repeat(3000)).is_err());
        assert_eq!(
            InnerPath::parse("//etc/./passwd").unwrap().as_string(),
            "/etc/passwd"
        );
        assert!(InnerPath::parse("").unwrap().is_root());
        // Names that merely contain dots are names.
        assert_eq!(
            InnerPath::parse("/a..b/...").unwrap().components(),
            ["a..b", "..."]
        );
    }
}
