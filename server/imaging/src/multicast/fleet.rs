//! The machines of a multicast deploy around the session: zeroing, the unicast fallback,
//! verification by hashes, the GPT of larger disks; and their states, shared between the
//! threads that work on them and reported to the watcher at every change.

use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use diskferry_blockdev::{BlockDevice, BlockError};
use diskferry_multicast::Outcome;
use diskferry_protocol::chunks::MAX_HASHES;
use diskferry_protocol::MulticastState;

use super::{MachineState, Phase, Staged, Target, Watch};
use crate::pipeline::capture::CopyError;
use crate::progress::Silent;
use crate::ranges;

/// Chunk size of the verification's hashes.
const VERIFY_CHUNK: u32 = 1 << 20;
/// How long a dropped machine's receiver has to notice the session ended before its disk is
/// written by unicast.
const RECEIVER_STOP: Duration = Duration::from_secs(15);

pub(super) struct Fleet<'a> {
    pub targets: &'a [Target],
    pub staged: &'a Staged,
    states: Mutex<Vec<MachineState>>,
    watch: &'a dyn Watch,
    boot_entries: bool,
}

impl<'a> Fleet<'a> {
    pub fn new(
        targets: &'a [Target],
        staged: &'a Staged,
        watch: &'a dyn Watch,
        boot_entries: bool,
    ) -> Fleet<'a> {
        let total = ranges::bytes(&staged.data);
        let states = targets
            .iter()
            .map(|t| MachineState {
                name: t.name.clone(),
                phase: super::Phase::Waiting,
                done: 0,
                total,
                delivery: None,
                error: None,
            })
            .collect();
        Fleet {
            targets,
            staged,
            states: Mutex::new(states),
            watch,
            boot_entries,
        }
    }

    pub fn into_states(self) -> Vec<MachineState> {
        self.states.into_inner().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes machine `i`'s state and tells the watcher.
    pub fn set(&self, i: usize, change: impl FnOnce(&mut MachineState)) {
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        change(&mut states[i]);
        self.watch.machines(&states);
    }

    /// Changes every machine's state (`change(i, state)`) and tells the watcher once.
    pub fn set_all(&self, mut change: impl FnMut(usize, &mut MachineState)) {
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        for (i, s) in states.iter_mut().enumerate() {
            change(i, s);
        }
        self.watch.machines(&states);
    }

    /// Machines not failed so far.
    pub fn live(&self) -> Vec<usize> {
        let states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        (0..states.len())
            .filter(|&i| states[i].phase != Phase::Failed)
            .collect()
    }

    fn fail(&self, i: usize, error: String) {
        tracing::warn!(machine = %self.targets[i].name, "{error}");
        self.set(i, |s| {
            s.phase = Phase::Failed;
            s.error = Some(error);
        });
    }

    /// Every machine zeroes the stage's zero ranges on its side, in parallel.
    pub fn zero_all(&self) {
        self.each(&(0..self.targets.len()).collect::<Vec<_>>(), |i, t| {
            self.set(i, |s| s.phase = Phase::Zeroing);
            if let Err(e) = zero(&*t.disk, &self.staged.zero) {
                self.fail(i, format!("zeroing before the session: {e}"));
            }
        });
    }

    /// Every live machine: unicast where the session did not deliver, then verification.
    pub fn finish_all(&self, outcomes: &[Option<Outcome>]) {
        self.each(&self.live(), |i, t| {
            if let Err(e) = self.finish(i, t, outcomes[i].as_ref()) {
                self.fail(i, e);
            }
        });
    }

    /// Runs `f` for the machines `which`, each on a thread of its own.
    fn each(&self, which: &[usize], f: impl Fn(usize, &Target) + Sync) {
        std::thread::scope(|s| {
            for &i in which {
                let f = &f;
                s.spawn(move || f(i, &self.targets[i]));
            }
        });
    }

    fn finish(&self, i: usize, t: &Target, outcome: Option<&Outcome>) -> Result<(), String> {
        let status = t.disk.multicast_status().map_err(|e| e.to_string())?;
        let delivered = outcome == Some(&Outcome::Done) && status.state == MulticastState::Done;
        let delivery = if delivered {
            "multicast".to_owned()
        } else {
            let reason = match (outcome, status.state) {
                (_, MulticastState::Failed) => status.message.clone(),
                (Some(Outcome::Dropped), _) => "the session dropped it".to_owned(),
                _ => "it did not take part in the session".to_owned(),
            };
            self.unicast(i, t, &reason)?;
            format!("unicast ({reason})")
        };
        self.set(i, |s| {
            s.phase = Phase::Verifying;
            s.delivery = Some(delivery);
        });
        t.disk.flush().map_err(|e| format!("flushing: {e}"))?;
        verify(&*self.staged.device, &*t.disk, &self.staged.must_hold())?;
        if t.disk.size() > self.staged.device.size() {
            move_gpt_backup(&*self.staged.device, &*t.disk)?;
        }
        if self.boot_entries {
            let disk: Arc<dyn BlockDevice> = Arc::clone(&t.disk) as Arc<dyn BlockDevice>;
            let line = crate::boot_entry::register(t.disk.connection(), &disk);
            tracing::info!(machine = %t.name, "{line}");
        }
        self.set(i, |s| {
            s.phase = Phase::Done;
            s.done = s.total;
        });
        Ok(())
    }

    /// Writes the stage's data ranges to a machine the session left behind.
    fn unicast(&self, i: usize, t: &Target, reason: &str) -> Result<(), String> {
        tracing::info!(machine = %t.name, "writing by unicast: {reason}");
        let deadline = Instant::now() + RECEIVER_STOP;
        while t.disk.multicast_status().map_err(|e| e.to_string())?.state == MulticastState::Running
        {
            if Instant::now() > deadline {
                return Err("its multicast receiver did not stop".into());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        self.set(i, |s| {
            s.phase = Phase::Unicast;
            s.done = 0;
        });
        let data = &self.staged.data;
        // Zeros inside the data ranges are skipped by the copy: zero first.
        zero(&*t.disk, data).map_err(|e| format!("zeroing for the unicast copy: {e}"))?;
        let dst: Arc<dyn BlockDevice> = Arc::clone(&t.disk) as Arc<dyn BlockDevice>;
        crate::pipeline::capture::copy_ranges(&*self.staged.device, &dst, data, &Silent).map_err(
            |e| match e {
                CopyError::Read(e) => format!("unicast copy: reading the stage: {e}"),
                CopyError::Write(e) => format!("unicast copy: {e}"),
            },
        )?;
        Ok(())
    }
}

/// Zeroes `ranges` on `disk` (a remote agent zeroes on its side).
fn zero(disk: &dyn BlockDevice, ranges: &[Range<u64>]) -> Result<(), BlockError> {
    ranges
        .iter()
        .try_for_each(|r| crate::pipeline::partition_copy::zero(disk, r.clone()))
}

/// Compares the hashes of `ranges` on `disk` (computed by its agent) with the stage's.
fn verify(
    stage: &dyn BlockDevice,
    disk: &dyn BlockDevice,
    ranges: &[Range<u64>],
) -> Result<(), String> {
    let span = MAX_HASHES as u64 * u64::from(VERIFY_CHUNK);
    for r in ranges {
        let mut at = r.start;
        while at < r.end {
            let n = (r.end - at).min(span);
            let theirs = disk
                .chunk_hashes(at, n, VERIFY_CHUNK)
                .map_err(|e| format!("verify: hashing on the machine: {e}"))?;
            let ours = stage
                .chunk_hashes(at, n, VERIFY_CHUNK)
                .map_err(|e| format!("verify: hashing the stage: {e}"))?;
            if let Some(k) = (0..ours.len()).find(|&k| theirs.get(k) != Some(&ours[k])) {
                let from = at + k as u64 * u64::from(VERIFY_CHUNK);
                let to = (from + u64::from(VERIFY_CHUNK)).min(at + n);
                return Err(format!(
                    "verify: bytes {from}..{to} differ from what was sent"
                ));
            }
            at += n;
        }
    }
    Ok(())
}

/// A disk larger than the stage: its GPT's backup header and array go to its own end.
fn move_gpt_backup(stage: &dyn BlockDevice, disk: &dyn BlockDevice) -> Result<(), String> {
    let Ok(table) = diskferry_partition::read_table(stage) else {
        return Ok(());
    };
    if table.scheme != diskferry_partition::Scheme::Gpt {
        return Ok(());
    }
    diskferry_partition::write_table(disk, &table)
        .and_then(|()| disk.flush().map_err(Into::into))
        .map_err(|e| format!("moving the GPT backup to the end of the disk: {e}"))?;
    match diskferry_partition::read_table(disk) {
        Ok(back) if back.partitions == table.partitions && back.warnings.is_empty() => Ok(()),
        Ok(back) => Err(format!(
            "the GPT read back after moving its backup is not the one written ({:?})",
            back.warnings
        )),
        Err(e) => Err(format!("reading the GPT back: {e}")),
    }
}
