//! The ingress tests' app, run in a container on `0.0.0.0:PORT` (8080 by default): a
//! WebSocket echo (every text or binary message sent back as it came), and for plain HTTP
//! requests an answer saying how many body bytes it read (declared or chunked), so a test
//! can tell a body reached it whole.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};

fn websocket(stream: TcpStream) {
    let Ok(mut ws) = tungstenite::accept(stream) else {
        return;
    };
    loop {
        match ws.read() {
            Ok(m) if m.is_text() || m.is_binary() => {
                if ws.send(m).is_err() {
                    return;
                }
            }
            Ok(m) if m.is_close() => {
                let _ = ws.flush();
                return;
            }
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

/// Reads a body of `len` bytes, or a chunked one; answers how many bytes it had.
fn body(r: &mut BufReader<TcpStream>, len: Option<u64>, chunked: bool) -> Option<u64> {
    let mut sink = std::io::sink();
    if !chunked {
        let n = len.unwrap_or(0);
        return (std::io::copy(&mut r.take(n), &mut sink).ok()? == n).then_some(n);
    }
    let mut total = 0;
    loop {
        let mut line = String::new();
        r.read_line(&mut line).ok()?;
        let size = u64::from_str_radix(line.trim().split(';').next()?, 16).ok()?;
        if size == 0 {
            // Trailers, then the blank line.
            loop {
                line.clear();
                r.read_line(&mut line).ok()?;
                if line.trim().is_empty() {
                    return Some(total);
                }
            }
        }
        if std::io::copy(&mut r.by_ref().take(size), &mut sink).ok()? != size {
            return None;
        }
        total += size;
        line.clear();
        r.read_line(&mut line).ok()?;
    }
}

fn plain(stream: TcpStream) {
    let mut out = match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    };
    let mut r = BufReader::new(stream);
    loop {
        let mut request = String::new();
        if r.read_line(&mut request).unwrap_or(0) == 0 {
            return;
        }
        let (mut len, mut chunked, mut close) = (None, false, false);
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end().to_ascii_lowercase();
            if line.is_empty() {
                break;
            }
            if let Some(v) = line.strip_prefix("content-length:") {
                len = v.trim().parse().ok();
            } else if let Some(v) = line.strip_prefix("transfer-encoding:") {
                chunked = v.contains("chunked");
            } else if line == "connection: close" {
                close = true;
            }
        }
        let Some(n) = body(&mut r, len, chunked) else {
            return;
        };
        let text = format!("ws-echo read {n} bytes\n");
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
            text.len()
        );
        if out.write_all(head.as_bytes()).is_err() || out.write_all(text.as_bytes()).is_err() {
            return;
        }
        if close {
            return;
        }
    }
}

fn serve(stream: TcpStream) {
    let mut peek = [0u8; 2048];
    let n = stream.peek(&mut peek).unwrap_or(0);
    let head = String::from_utf8_lossy(&peek[..n]).to_ascii_lowercase();
    if head.contains("upgrade: websocket") {
        websocket(stream)
    } else {
        plain(stream)
    }
}

fn main() {
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(8080);
    let l = TcpListener::bind(("0.0.0.0", port)).expect("bind");
    for s in l.incoming().flatten() {
        std::thread::spawn(move || serve(s));
    }
}
