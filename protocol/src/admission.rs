//! Admission control for a listening port — the agent port, the client, the HTTP listener,
//! TFTP: how many connections (or transfers) may be in a stage (say, the unauthenticated
//! handshake) at once, overall and per source address. A connection over
//! either cap is turned away at once instead of queueing, so a flood from one address cannot
//! take the slots the real peer needs, and a flood from many cannot exhaust file descriptors.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// The caps of one stage.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections from one address at once.
    pub per_address: usize,
    /// Connections at once overall.
    pub total: usize,
}

/// Counts connections in one stage.
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
}

/// One admitted connection; dropping it frees its slot.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    address: IpAddr,
}

/// Why a connection was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("too many connections from this address ({0} at once)")]
    PerAddress(usize),
    #[error("too many connections ({0} at once)")]
    Total(usize),
}

impl Admission {
    pub fn new(limits: Limits) -> Arc<Admission> {
        Arc::new(Admission {
            limits,
            state: Mutex::default(),
        })
    }

    /// Takes a slot for a connection from `address`, or says which cap is full.
    pub fn admit(self: &Arc<Self>, address: IpAddr) -> Result<Ticket, Refused> {
        // An IPv4 peer on an IPv6 socket is the same peer as on an IPv4 one.
        let address = address.to_canonical();
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.total >= self.limits.total {
            return Err(Refused::Total(self.limits.total));
        }
        let mine = st.by_address.entry(address).or_default();
        if *mine >= self.limits.per_address {
            return Err(Refused::PerAddress(self.limits.per_address));
        }
        *mine += 1;
        st.total += 1;
        Ok(Ticket {
            admission: Arc::clone(self),
            address,
        })
    }

    /// Connections admitted now.
    pub fn in_use(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).total
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut st = self
            .admission
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        st.total -= 1;
        if let Some(n) = st.by_address.get_mut(&self.address) {
            *n -= 1;
            if *n == 0 {
                st.by_address.remove(&self.address);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_address_cannot_take_the_slots_of_others() {
        let a = Admission::new(Limits {
            per_address: 2,
            total: 3,
        });
        let hostile: IpAddr = "10.0.0.66".parse().unwrap();
        let server: IpAddr = "10.0.0.1".parse().unwrap();
        let t1 = a.admit(hostile).unwrap();
        let _t2 = a.admit(hostile).unwrap();
        assert_eq!(a.admit(hostile).unwrap_err(), Refused::PerAddress(2));
        let s = a.admit(server).unwrap();
        assert_eq!(
            a.admit("10.0.0.2".parse().unwrap()).unwrap_err(),
            Refused::Total(3)
        );
        drop(t1);
        drop(s);
        assert_eq!(a.in_use(), 1);
        assert!(a.admit(hostile).is_ok(), "a freed slot is usable again");
    }
}
