//! Identity documents as a hostile agent announces them: parsed as the agent port parses them,
//! then enrolled, approved and enrolled again under varying keys and tokens. Nothing may panic,
//! and whatever sequence comes, no MAC address ever belongs to two machines and the catalog
//! stays within its pending cap. Run: `cd server/fuzz && cargo fuzz run enroll_identity`.
#![no_main]

use std::cell::RefCell;

use diskferry_daemon::catalog::{Catalog, MachineIdentity};
use libfuzzer_sys::fuzz_target;

thread_local! {
    /// One catalog for many inputs (a fresh one every 500, so the pending cap does not end
    /// the exploration); the directory lives as long as the catalog.
    static CATALOG: RefCell<(usize, Option<(tempfile::TempDir, Catalog)>)> = RefCell::new((0, None));
}

fn with_catalog(f: impl FnOnce(&Catalog)) {
    CATALOG.with(|c| {
        let mut c = c.borrow_mut();
        c.0 += 1;
        if c.1.is_none() || c.0 % 500 == 0 {
            let dir = tempfile::tempdir().unwrap();
            let cat = Catalog::open(dir.path()).unwrap();
            c.1 = Some((dir, cat));
        }
        f(&c.1.as_ref().unwrap().1);
    });
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, doc)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(doc) else { return };
    let Ok(identity) = serde_json::from_str::<MachineIdentity>(text) else { return };
    let key = format!("key-{}", ctl % 4);
    let booted = identity.macs.get(usize::from(ctl >> 4) % 3).cloned();
    with_catalog(|cat| {
        let enrolled = cat.enroll(&identity, &key, booted.as_deref().filter(|_| ctl & 8 != 0));
        if let Ok(e) = &enrolled {
            if ctl & 4 != 0 {
                let _ = cat.approve_machine(e.machine_id);
            }
            let _ = cat.enroll(&identity, &key, None);
        }
        let machines = cat.machines().unwrap();
        let mut macs: Vec<&String> = machines.iter().flat_map(|m| &m.macs).collect();
        let all = macs.len();
        macs.sort();
        macs.dedup();
        assert_eq!(macs.len(), all, "a MAC belongs to two machines");
        let pending = machines.iter().filter(|m| !m.approved && m.pending.is_some()).count();
        assert!(pending <= 256 + 1, "{pending} machines pending");
    });
});
