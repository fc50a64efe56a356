//! The client side of the plugin -> node agent contract ([`ambient_common::agent_api`]):
//! one blocking unix-socket connection per call, one frame each way. `timeoutMs` bounds the
//! connect (through `SO_SNDTIMEO`, which Linux applies to a unix-socket connect waiting on a
//! full backlog: an agent that stopped accepting), each write and each read.

use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ambient_common::agent_api::{AgentReply, AgentRequest};
use ambient_common::frame::{read_frame, write_frame, FrameError};
use nix::errno::Errno;
use nix::sys::socket::{
    connect, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, UnixAddr,
};
use nix::sys::time::{TimeVal, TimeValLike};

#[derive(Debug, thiserror::Error)]
pub enum AgentCallError {
    #[error("the node agent is not running: there is no socket at {socket}")]
    NoSocket {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the node agent is not accepting connections on {socket} (is it running? it may be restarting)")]
    Refused {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to the node agent's socket {socket} (check its permissions)")]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the node agent on {socket} did not accept the connection within {timeout_ms} ms (timeoutMs): it is running but stuck")]
    ConnectTimeout { socket: PathBuf, timeout_ms: u128 },
    #[error("the node agent on {socket} did not answer within {timeout_ms} ms (timeoutMs)")]
    Timeout {
        socket: PathBuf,
        timeout_ms: u128,
        #[source]
        source: FrameError,
    },
    #[error("the exchange with the node agent on {socket} failed (is the plugin the same version as the agent?)")]
    Exchange {
        socket: PathBuf,
        #[source]
        source: FrameError,
    },
}

impl AgentCallError {
    /// The agent could not be reached at all (as opposed to: reached, but the exchange failed).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            AgentCallError::NoSocket { .. }
                | AgentCallError::Refused { .. }
                | AgentCallError::Connect { .. }
        )
    }

    /// Unreachable, or reached but silent until the timeout: either way no answer can be had.
    /// (An answer that could not be understood is neither.)
    pub fn is_unavailable(&self) -> bool {
        self.is_unreachable()
            || matches!(
                self,
                AgentCallError::ConnectTimeout { .. } | AgentCallError::Timeout { .. }
            )
    }
}

/// Something that answers agent requests: [`UnixAgent`], or a fake in tests.
pub trait AgentClient {
    fn call(&self, request: &AgentRequest) -> Result<AgentReply, AgentCallError>;
}

/// The node agent behind its unix socket.
#[derive(Debug, Clone)]
pub struct UnixAgent {
    socket: PathBuf,
    timeout: Duration,
}

impl UnixAgent {
    pub fn new(socket: impl Into<PathBuf>, timeout: Duration) -> Self {
        Self {
            socket: socket.into(),
            timeout,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

impl UnixAgent {
    fn connect(&self) -> Result<UnixStream, AgentCallError> {
        let path = self.socket.clone();
        let other = |source: std::io::Error| AgentCallError::Connect {
            socket: self.socket.clone(),
            source,
        };
        let addr = UnixAddr::new(&self.socket).map_err(|e| other(e.into()))?;
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| other(e.into()))?;
        let millis = i64::try_from(self.timeout.as_millis()).unwrap_or(i64::MAX);
        setsockopt(&fd, sockopt::SendTimeout, &TimeVal::milliseconds(millis))
            .map_err(|e| other(e.into()))?;
        match connect(fd.as_raw_fd(), &addr) {
            Ok(()) => Ok(UnixStream::from(fd)),
            Err(Errno::ENOENT) => Err(AgentCallError::NoSocket {
                socket: path,
                source: Errno::ENOENT.into(),
            }),
            Err(Errno::ECONNREFUSED) => Err(AgentCallError::Refused {
                socket: path,
                source: Errno::ECONNREFUSED.into(),
            }),
            Err(Errno::EAGAIN | Errno::EINPROGRESS | Errno::ETIMEDOUT) => {
                Err(AgentCallError::ConnectTimeout {
                    socket: path,
                    timeout_ms: self.timeout.as_millis(),
                })
            }
            Err(e) => Err(other(e.into())),
        }
    }
}

impl AgentClient for UnixAgent {
    fn call(&self, request: &AgentRequest) -> Result<AgentReply, AgentCallError> {
        let mut stream = self.connect()?;
        let exchange = |source: FrameError| {
            let timed_out = matches!(&source, FrameError::Io(e)
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut));
            if timed_out {
                AgentCallError::Timeout {
                    socket: self.socket.clone(),
                    timeout_ms: self.timeout.as_millis(),
                    source,
                }
            } else {
                AgentCallError::Exchange {
                    socket: self.socket.clone(),
                    source,
                }
            }
        };
        let io = |e: std::io::Error| exchange(FrameError::Io(e));
        stream.set_read_timeout(Some(self.timeout)).map_err(io)?;
        stream.set_write_timeout(Some(self.timeout)).map_err(io)?;
        write_frame(&mut stream, request).map_err(exchange)?;
        read_frame(&mut stream).map_err(exchange)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ambient_common::agent_api::{AgentOp, AgentReply};
    use std::os::unix::net::UnixListener;

    #[test]
    fn one_frame_each_way() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cni.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let req: AgentRequest = read_frame(&mut s).unwrap();
            write_frame(&mut s, &AgentReply::Ready).unwrap();
            req
        });
        let agent = UnixAgent::new(&path, Duration::from_secs(5));
        let reply = agent.call(&AgentRequest::new(AgentOp::Status)).unwrap();
        assert_eq!(reply, AgentReply::Ready);
        assert_eq!(server.join().unwrap(), AgentRequest::new(AgentOp::Status));
    }

    #[test]
    fn unreachable_kinds() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.sock");
        let err = UnixAgent::new(&missing, Duration::from_secs(1))
            .call(&AgentRequest::new(AgentOp::Status))
            .unwrap_err();
        assert!(matches!(err, AgentCallError::NoSocket { .. }) && err.is_unreachable());
        assert!(err.to_string().contains("missing.sock"));

        let stale = dir.path().join("stale.sock");
        drop(UnixListener::bind(&stale).unwrap());
        let err = UnixAgent::new(&stale, Duration::from_secs(1))
            .call(&AgentRequest::new(AgentOp::Status))
            .unwrap_err();
        assert!(matches!(err, AgentCallError::Refused { .. }) && err.is_unreachable());
    }

    #[test]
    fn an_agent_that_stopped_accepting_times_out_on_connect() {
        use nix::sys::socket::{bind, listen, Backlog};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stuck.sock");
        let listener = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        bind(listener.as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
        listen(&listener, Backlog::new(0).unwrap()).unwrap();
        // Fill the backlog: the listener never accepts.
        let mut held = Vec::new();
        let agent = UnixAgent::new(&path, Duration::from_millis(100));
        let err = loop {
            match agent.connect() {
                Ok(s) => held.push(s),
                Err(e) => break e,
            }
            assert!(held.len() < 16, "the backlog never filled");
        };
        assert!(
            matches!(err, AgentCallError::ConnectTimeout { .. }),
            "{err:?}"
        );
        assert!(err.is_unavailable() && !err.is_unreachable());
    }

    #[test]
    fn a_silent_agent_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("slow.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let _: AgentRequest = read_frame(&mut s).unwrap();
            // Hold the connection open without answering until the client gives up.
            let mut buf = [0u8; 1];
            let _ = std::io::Read::read(&mut s, &mut buf);
        });
        let err = UnixAgent::new(&path, Duration::from_millis(100))
            .call(&AgentRequest::new(AgentOp::Status))
            .unwrap_err();
        assert!(matches!(err, AgentCallError::Timeout { .. }), "{err:?}");
        assert!(!err.is_unreachable());
        server.join().unwrap();
    }
}
