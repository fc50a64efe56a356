//! A stand-in node agent: serves the plugin -> agent contract (`ambient_common::agent_api`
//! over `ambient_common::frame`) on a unix socket, records every request and answers with a
//! configurable reply (by default ADD -> `Added(Captured)`, DEL -> `Released`, CHECK ->
//! `Checked`, STATUS -> `Ready`, GC -> `Collected { released: 0 }`).
//!
//! It lets plugin and runtime tests run without the real agent. Dropping it stops the server
//! thread and removes the socket file.

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

    pub fn with_responder(path: &Path, responder: Responder) -> Result<Self, FakeAgentError> {
        let listener = UnixListener::bind(path).map_err(|source| FakeAgentError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s) = (requests.clone(), stop.clone());
        let thread = std::thread::spawn(move || serve(listener, responder, r, s));
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
    responder: Responder,
    requests: Arc<Mutex<Vec<AgentRequest>>>,
    stop: Arc<AtomicBool>,
) {
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
        let reply = responder(&req);
        requests.lock().unwrap().push(req);
        let _ = frame::write_frame(&mut conn, &reply);
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
}
