//! A stand-in node agent: serves the plugin -> agent contract (`ambient_common::agent_api`
//! over `ambient_common::frame`) on a unix socket, records every request and answers with a
//! configurable reply (by default ADD -> `Added(Captured)`, DEL -> `Released`, CHECK ->
//! `Checked`, STATUS -> `Ready`, GC -> `Collected { released: 0 }`).
//!
//! A test can also make it misbehave ([`Answer::Garbage`], [`Answer::Silent`]) to exercise the
//! plugin's failure paths. It lets plugin and runtime tests run without the real agent.
//! Dropping it stops the server thread and removes the socket file.

use std::io::Write as _;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use ambient_common::agent_api::{AddOutcome, AgentOp, AgentReply, AgentRequest};
use ambient_common::frame;

/// Decides the reply to a request.
pub type Responder = Box<dyn Fn(&AgentRequest) -> AgentReply + Send + Sync>;

/// What the fake agent does with a request.
#[derive(Debug, Clone)]
pub enum Answer {
    Reply(AgentReply),
    /// Bytes that are not a frame.
    Garbage(Vec<u8>),
    /// Read the request, then hold the connection open without answering.
    Silent,
}

type Answerer = Box<dyn Fn(&AgentRequest) -> Answer + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum FakeAgentError {
    #[error("cannot listen on {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The default answers: everything succeeds and every ADD is captured.
pub fn default_reply(req: &AgentRequest) -> AgentReply {
    match &req.op {
        AgentOp::Add(_) => AgentReply::Added(AddOutcome::Captured),
        AgentOp::Del(_) => AgentReply::Released,
        AgentOp::Check(_) => AgentReply::Checked,
        AgentOp::Status => AgentReply::Ready,
        AgentOp::Gc { .. } => AgentReply::Collected { released: 0 },
    }
}

pub struct FakeAgent {
    path: PathBuf,
    requests: Arc<Mutex<Vec<AgentRequest>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for FakeAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeAgent")
            .field("path", &self.path)
            .finish()
    }
}

impl FakeAgent {
    /// Serves at `path` with [`default_reply`].
    pub fn start(path: &Path) -> Result<Self, FakeAgentError> {
        Self::with_responder(path, Box::new(default_reply))
    }

    /// Serves at `path`, replying what `responder` decides.
    pub fn with_responder(path: &Path, responder: Responder) -> Result<Self, FakeAgentError> {
        Self::answering(path, move |req| Answer::Reply(responder(req)))
    }

    /// Serves at `path`, replying `reply` to every request.
    pub fn replying(path: &Path, reply: AgentReply) -> Result<Self, FakeAgentError> {
        Self::answering(path, move |_| Answer::Reply(reply.clone()))
    }

    /// Serves at `path`, doing what `answer` decides (replies, garbage or silence).
    pub fn answering(
        path: &Path,
        answer: impl Fn(&AgentRequest) -> Answer + Send + Sync + 'static,
    ) -> Result<Self, FakeAgentError> {
        let answer: Answerer = Box::new(answer);
        let listener = UnixListener::bind(path).map_err(|source| FakeAgentError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s) = (requests.clone(), stop.clone());
        let thread = std::thread::spawn(move || serve(listener, answer, r, s));
        Ok(Self {
            path: path.to_path_buf(),
            requests,
            stop,
            thread: Some(thread),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<AgentRequest> {
        self.requests.lock().unwrap().clone()
    }
}

fn serve(
    listener: UnixListener,
    answer: Answerer,
    requests: Arc<Mutex<Vec<AgentRequest>>>,
    stop: Arc<AtomicBool>,
) {
    // Connections answered with silence, held open until the agent stops.
    let mut held = Vec::new();
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(mut conn) = conn else { continue };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
        // One request, one reply per connection; a malformed request just closes it.
        let Ok(req) = frame::read_frame::<AgentRequest>(&mut conn) else {
            continue;
        };
        let answer = answer(&req);
        requests.lock().unwrap().push(req);
        match answer {
            Answer::Reply(reply) => {
                let _ = frame::write_frame(&mut conn, &reply);
            }
            Answer::Garbage(bytes) => {
                let _ = conn.write_all(&bytes);
            }
            Answer::Silent => held.push(conn),
        }
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ambient_common::agent_api::{AgentError, ErrorKind};

    fn ask(path: &Path, req: &AgentRequest) -> AgentReply {
        let mut c = UnixStream::connect(path).unwrap();
        frame::write_frame(&mut c, req).unwrap();
        frame::read_frame(&mut c).unwrap()
    }

    #[test]
    fn records_and_answers() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("cni.sock");
        let agent = FakeAgent::start(&sock).unwrap();
        let req = AgentRequest::new(AgentOp::Status);
        assert_eq!(ask(&sock, &req), AgentReply::Ready);
        assert_eq!(agent.requests(), vec![req]);
        drop(agent);
        assert!(!sock.exists());
    }

    #[test]
    fn custom_responder() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("cni.sock");
        let _agent = FakeAgent::with_responder(
            &sock,
            Box::new(|_| AgentReply::Error(AgentError::new(ErrorKind::NotReady, "syncing"))),
        )
        .unwrap();
        let r = ask(&sock, &AgentRequest::new(AgentOp::Status));
        assert!(matches!(r, AgentReply::Error(e) if e.kind == ErrorKind::NotReady));
    }

    #[test]
    fn garbage_and_silence() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("cni.sock");
        let _agent = FakeAgent::answering(&sock, |req| match req.op {
            AgentOp::Status => Answer::Garbage(b"\0\0\0\x05hello".to_vec()),
            _ => Answer::Silent,
        })
        .unwrap();
        let mut c = UnixStream::connect(&sock).unwrap();
        frame::write_frame(&mut c, &AgentRequest::new(AgentOp::Status)).unwrap();
        assert!(frame::read_frame::<AgentReply>(&mut c).is_err());
        let mut c = UnixStream::connect(&sock).unwrap();
        c.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        frame::write_frame(&mut c, &AgentRequest::new(AgentOp::Gc { valid: vec![] })).unwrap();
        // No answer: the read times out with the connection still open.
        let err = frame::read_frame::<AgentReply>(&mut c).unwrap_err();
        assert!(
            matches!(&err, frame::FrameError::Io(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "{err:?}"
        );
    }
}
