//! Readiness: the chain is valid and the node agent answers `Status` with `Ready`.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ambient_common::agent_api::{AgentOp, AgentReply, AgentRequest};
use ambient_common::frame::{self, FrameError};

#[derive(Debug, thiserror::Error)]
pub enum ReadyError {
    #[error("cannot reach the node agent at {path} (is the node-agent container running?)")]
    Unreachable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the node agent's answer was not understood")]
    Frame(#[source] FrameError),
    #[error("the node agent is not ready: {0:?}")]
    NotReady(AgentReply),
}

/// Sends `Status` to the agent and expects `Ready`.
pub fn agent_ready(socket: &Path, timeout: Duration) -> Result<(), ReadyError> {
    let unreachable = |source| ReadyError::Unreachable {
        path: socket.to_owned(),
        source,
    };
    let mut s = UnixStream::connect(socket).map_err(unreachable)?;
    s.set_read_timeout(Some(timeout)).map_err(unreachable)?;
    s.set_write_timeout(Some(timeout)).map_err(unreachable)?;
    frame::write_frame(&mut s, &AgentRequest::new(AgentOp::Status)).map_err(ReadyError::Frame)?;
    let reply: AgentReply = frame::read_frame(&mut s).map_err(ReadyError::Frame)?;
    match reply {
        AgentReply::Ready => Ok(()),
        other => Err(ReadyError::NotReady(other)),
    }
}
