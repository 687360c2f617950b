//! Output names reserved while a capture job runs. A request is checked long before its job
//! creates `NAME.partial` (it first connects to the source), so without a reservation two
//! captures to one name both pass the "does it exist" check. The first to reserve a name owns
//! it until its job ends; a second request is refused with a conflict. The imaging crate's
//! exclusive creation of `NAME.partial` is the second line of defence (other processes).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// The output paths of running captures.
#[derive(Debug, Default, Clone)]
pub(crate) struct OutputNames(Arc<Mutex<HashSet<PathBuf>>>);

/// A reserved output path; dropping it frees the name.
#[derive(Debug)]
pub(crate) struct Reservation {
    names: OutputNames,
    path: PathBuf,
}

impl OutputNames {
    fn set(&self) -> MutexGuard<'_, HashSet<PathBuf>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reserves `path`, or `None` when a running job holds it.
    pub(crate) fn reserve(&self, path: &Path) -> Option<Reservation> {
        self.set().insert(path.to_path_buf()).then(|| Reservation {
            names: self.clone(),
            path: path.to_path_buf(),
        })
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.names.set().remove(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_held_until_its_reservation_is_dropped() {
        let names = OutputNames::default();
        let a = Path::new("/data/captures/dup.qcow2");
        let first = names.reserve(a).expect("free name");
        assert!(names.reserve(a).is_none(), "reserved twice");
        let other = names.reserve(Path::new("/data/captures/other.qcow2"));
        assert!(other.is_some());
        drop(first);
        assert!(names.reserve(a).is_some(), "freed when the job ended");
    }
}
