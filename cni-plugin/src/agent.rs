//! The client side of the plugin -> node agent contract ([`ambient_common::agent_api`]):
//! one blocking unix-socket connection per call, one frame each way, read and write timeouts
//! from `timeoutMs`.

use std::io::ErrorKind;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ambient_common::agent_api::{AgentReply, AgentRequest};
use ambient_common::frame::{read_frame, write_frame, FrameError};

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

impl AgentClient for UnixAgent {
    fn call(&self, request: &AgentRequest) -> Result<AgentReply, AgentCallError> {
        let socket = self.socket.clone();
        let mut stream =
            UnixStream::connect(&self.socket).map_err(|source| match source.kind() {
                ErrorKind::NotFound => AgentCallError::NoSocket { socket, source },
                ErrorKind::ConnectionRefused => AgentCallError::Refused { socket, source },
                _ => AgentCallError::Connect { socket, source },
            })?;
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
