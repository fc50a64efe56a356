//! Framing for the local unix-socket contracts: a 4-byte big-endian length, then that many
//! bytes of JSON. How many frames a connection carries is the contract's business (one
//! request and one reply for the plugin's; a long-lived sequence for ztunnel's). Lengths
//! above [`MAX_FRAME`] are refused before anything is allocated.

use std::io::{Read, Write};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Largest frame either side accepts (a GC request for a few thousand attachments fits).
pub const MAX_FRAME: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("peer closed the connection before a complete frame")]
    Truncated(#[source] std::io::Error),
    #[error("socket I/O failed")]
    Io(#[source] std::io::Error),
    #[error("frame is not a valid message: {0}")]
    Decode(#[source] serde_json::Error),
    #[error("message could not be encoded")]
    Encode(#[source] serde_json::Error),
}

/// Encodes `msg` with its length header.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let body = serde_json::to_vec(msg).map_err(FrameError::Encode)?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Validates a length header and returns the body length it announces.
pub fn body_len(header: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len)
}

/// Decodes a frame body.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    serde_json::from_slice(body).map_err(FrameError::Decode)
}

/// Writes one frame (blocking).
pub fn write_frame<T: Serialize>(w: &mut impl Write, msg: &T) -> Result<(), FrameError> {
    let bytes = encode(msg)?;
    w.write_all(&bytes).map_err(FrameError::Io)?;
    w.flush().map_err(FrameError::Io)
}

/// Reads one frame (blocking).
pub fn read_frame<T: DeserializeOwned>(r: &mut impl Read) -> Result<T, FrameError> {
    let mut header = [0u8; 4];
    r.read_exact(&mut header).map_err(truncated)?;
    let len = body_len(header)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).map_err(truncated)?;
    decode(&body)
}

/// Writes one frame to an async stream.
#[cfg(feature = "rt")]
pub async fn write_frame_async<T: Serialize>(
    w: &mut (impl tokio::io::AsyncWrite + Unpin),
    msg: &T,
) -> Result<(), FrameError> {
    use tokio::io::AsyncWriteExt;
    let bytes = encode(msg)?;
    w.write_all(&bytes).await.map_err(FrameError::Io)?;
    w.flush().await.map_err(FrameError::Io)
}

/// Reads one frame from an async stream. `Ok(None)` is the peer closing the connection
/// between frames; a close inside a frame is [`FrameError::Truncated`].
#[cfg(feature = "rt")]
pub async fn read_frame_async<T: DeserializeOwned>(
    r: &mut (impl tokio::io::AsyncRead + Unpin),
) -> Result<Option<T>, FrameError> {
    use tokio::io::AsyncReadExt;
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < header.len() {
        match r.read(&mut header[got..]).await.map_err(FrameError::Io)? {
            0 if got == 0 => return Ok(None),
            0 => {
                return Err(FrameError::Truncated(
                    std::io::ErrorKind::UnexpectedEof.into(),
                ))
            }
            n => got += n,
        }
    }
    let mut body = vec![0u8; body_len(header)?];
    r.read_exact(&mut body).await.map_err(truncated)?;
    decode(&body).map(Some)
}

fn truncated(e: std::io::Error) -> FrameError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        FrameError::Truncated(e)
    } else {
        FrameError::Io(e)
    }
}

/// The rule both control sockets apply to their caller, whose uid and pid the server reads
/// from the socket (SO_PEERCRED) rather than believing anything the caller says: only uid
/// `allowed` may `act`; `role` names who that is and the flag that sets it.
pub fn peer_uid_allowed(
    uid: u32,
    pid: Option<i32>,
    allowed: u32,
    act: &str,
    role: &str,
) -> Result<(), String> {
    if uid == allowed {
        Ok(())
    } else {
        Err(format!(
            "uid {uid} (pid {pid:?}) may not {act}; only uid {allowed} ({role}) may"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_configured_uid_passes() {
        assert_eq!(peer_uid_allowed(0, Some(7), 0, "x", "y"), Ok(()));
        let e = peer_uid_allowed(1000, Some(7), 0, "push workloads", "the node agent").unwrap_err();
        assert_eq!(
            e,
            "uid 1000 (pid Some(7)) may not push workloads; only uid 0 (the node agent) may"
        );
    }

    #[test]
    fn round_trip() {
        let bytes = encode(&serde_json::json!({"a": 1})).unwrap();
        let v: serde_json::Value = read_frame(&mut &bytes[..]).unwrap();
        assert_eq!(v["a"], 1);
    }

    #[test]
    fn oversized_header_is_refused_before_reading() {
        let header = ((MAX_FRAME + 1) as u32).to_be_bytes();
        let err = read_frame::<serde_json::Value>(&mut &header[..]).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge(_)));
    }

    #[cfg(feature = "rt")]
    #[tokio::test]
    async fn async_frames_round_trip_and_close_cleanly_only_between_frames() {
        let mut buf = Vec::new();
        write_frame_async(&mut buf, &serde_json::json!({"a": 1}))
            .await
            .unwrap();
        write_frame_async(&mut buf, &serde_json::json!({"a": 2}))
            .await
            .unwrap();
        let mut r = &buf[..];
        for want in [1, 2] {
            let v: serde_json::Value = read_frame_async(&mut r).await.unwrap().unwrap();
            assert_eq!(v["a"], want);
        }
        assert!(read_frame_async::<serde_json::Value>(&mut r)
            .await
            .unwrap()
            .is_none());
        for end in 1..buf.len() / 2 {
            let err = read_frame_async::<serde_json::Value>(&mut &buf[..end]).await;
            assert!(
                matches!(err, Err(FrameError::Truncated(_))),
                "{end}: {err:?}"
            );
        }
        let header = ((MAX_FRAME + 1) as u32).to_be_bytes();
        let err = read_frame_async::<serde_json::Value>(&mut &header[..]).await;
        assert!(matches!(err, Err(FrameError::TooLarge(_))));
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let bytes = encode(&serde_json::json!({"op": "status"})).unwrap();
        for end in 0..bytes.len() {
            assert!(read_frame::<serde_json::Value>(&mut &bytes[..end]).is_err());
        }
    }
}
