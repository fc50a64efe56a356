//! Bounds on inbound HBONE handshakes: an accepted connection on 15008 costs a task, a TLS
//! state and a socket until the client has proven who it is, so connections still in their
//! handshake are limited per source IP and in total, and each has a short deadline. A flood
//! of half-open TLS from one source then costs at most its share, and real clients from other
//! sources are served at once. Refusals are counted
//! (`ztunnel_hbone_handshakes_refused_total{reason}`) and logged once per source per minute.

use ambient_common::sync::Mutex;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

/// Why a handshake was not started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    PerSource,
    Total,
}

impl Refused {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PerSource => "per_source_limit",
            Self::Total => "total_limit",
        }
    }
}

#[derive(Debug, Default)]
struct InFlight {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// Handshakes in flight, per source and in total.
#[derive(Debug)]
pub struct HandshakeLimits {
    per_source: usize,
    total: usize,
    in_flight: Mutex<InFlight>,
    pub(crate) log: super::local::LogLimiter,
}

/// One handshake's place; given back when dropped (the handshake ended either way).
#[derive(Debug)]
pub struct HandshakeSlot {
    limits: Arc<HandshakeLimits>,
    src: IpAddr,
}

impl HandshakeLimits {
    pub fn new(per_source: usize, total: usize) -> Arc<Self> {
        Arc::new(Self {
            per_source,
            total,
            in_flight: Mutex::default(),
            log: Default::default(),
        })
    }

    /// A place for a handshake from `src`, if both bounds allow it.
    pub fn try_acquire(self: &Arc<Self>, src: IpAddr) -> Result<HandshakeSlot, Refused> {
        let mut f = self.in_flight.lock();
        if f.total >= self.total {
            return Err(Refused::Total);
        }
        let n = f.by_source.entry(src).or_default();
        if *n >= self.per_source {
            return Err(Refused::PerSource);
        }
        *n += 1;
        f.total += 1;
        Ok(HandshakeSlot {
            limits: self.clone(),
            src,
        })
    }

    /// Handshakes in flight (total, from `src`).
    pub fn in_flight(&self, src: IpAddr) -> (usize, usize) {
        let f = self.in_flight.lock();
        (f.total, f.by_source.get(&src).copied().unwrap_or(0))
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut f = self.limits.in_flight.lock();
        f.total -= 1;
        if let Some(n) = f.by_source.get_mut(&self.src) {
            *n -= 1;
            if *n == 0 {
                f.by_source.remove(&self.src);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_per_source_and_total_and_gives_back() {
        let l = HandshakeLimits::new(2, 3);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = l.try_acquire(a).unwrap();
        let _a2 = l.try_acquire(a).unwrap();
        assert_eq!(l.try_acquire(a).unwrap_err(), Refused::PerSource);
        let _b1 = l.try_acquire(b).unwrap();
        assert_eq!(l.try_acquire(b).unwrap_err(), Refused::Total);
        drop(a1);
        assert_eq!(l.in_flight(a), (2, 1));
        let _b2 = l.try_acquire(b).unwrap();
        assert_eq!(l.in_flight(b), (3, 2));
    }
}
