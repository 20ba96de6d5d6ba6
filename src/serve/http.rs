//! Just enough HTTP/1.1 for `sun serve`, on `std::net`: one request per connection (every
//! response says `Connection: close`), bodies framed by `Content-Length` only, responses with a
//! `Content-Length` or a server-sent-event stream that ends when the connection closes.
//!
//! Reading is bounded in size (head and body) and in time (one deadline for the whole request),
//! so a slow, silent or hostile client costs one thread for a bounded while and never memory.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

/// The most headers a request may carry.
const MAX_HEADERS: usize = 64;

/// Bounds on what a request may send.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RequestLimits {
    /// Request line plus headers, in bytes.
    pub(crate) max_head_bytes: usize,
    /// The body, in bytes.
    pub(crate) max_body_bytes: usize,
    /// Time allowed to receive the whole request.
    pub(crate) read_timeout: Duration,
}

/// A parsed request.
#[derive(Debug)]
pub(crate) struct Request {
    /// The method, e.g. `POST`.
    pub(crate) method: String,
    /// The target's path, without the query string.
    pub(crate) path: String,
    /// The body (empty without `Content-Length`).
    pub(crate) body: Vec<u8>,
}

/// A request that cannot be served: the status to answer with and why.
#[derive(Debug)]
pub(crate) struct HttpError {
    /// The HTTP status code (4xx or 5xx).
    pub(crate) status: u16,
    /// A message for the client.
    pub(crate) message: String,
}

impl HttpError {
    /// An error with `status` and `message`.
    pub(crate) fn new(status: u16, message: impl Into<String>) -> Self {
        HttpError {
            status,
            message: message.into(),
        }
    }
}

/// Reads from the socket, failing with `TimedOut` once `deadline` has passed.
struct DeadlineReader<'a> {
    stream: &'a TcpStream,
    deadline: Instant,
}

impl Read for DeadlineReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

/// Maps a read failure to the answer: 408 on a timeout, 400 otherwise.
fn read_failure(e: io::Error, what: &str) -> HttpError {
    match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => HttpError::new(
            408,
            format!("the request took too long to arrive (while reading its {what})"),
        ),
        io::ErrorKind::UnexpectedEof => HttpError::new(
            400,
            format!("the connection ended in the middle of the request's {what}"),
        ),
        _ => HttpError::new(400, format!("could not read the request's {what}: {e}")),
    }
}

/// Reads one request from `stream` within `limits`. Answers `100 Continue` to a client that
/// asks for it before sending the body.
pub(crate) fn read_request(
    stream: &TcpStream,
    limits: &RequestLimits,
) -> Result<Request, HttpError> {
    let mut reader = BufReader::new(DeadlineReader {
        stream,
        deadline: Instant::now() + limits.read_timeout,
    });
    let head = read_head(&mut reader, limits.max_head_bytes)?;
    let mut lines = head.split("\r\n");
    let (method, path) = parse_request_line(lines.next().unwrap_or(""))?;
    let mut content_length: Option<usize> = None;
    let mut expect_continue = false;
    for (count, line) in lines.filter(|l| !l.is_empty()).enumerate() {
        if count == MAX_HEADERS {
            return Err(HttpError::new(
                431,
                format!("more than {MAX_HEADERS} headers"),
            ));
        }
        let (name, value) = parse_header(line)?;
        if name.eq_ignore_ascii_case("content-length") {
            let n = parse_content_length(value)?;
            if content_length.is_some_and(|old| old != n) {
                return Err(HttpError::new(400, "conflicting Content-Length headers"));
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HttpError::new(
                411,
                "Transfer-Encoding request bodies are not supported; send a Content-Length",
            ));
        } else if name.eq_ignore_ascii_case("expect") {
            if !value.eq_ignore_ascii_case("100-continue") {
                return Err(HttpError::new(
                    417,
                    format!("cannot meet the expectation {value:?}"),
                ));
            }
            expect_continue = true;
        }
    }
    let length = content_length.unwrap_or(0);
    if method == "POST" && content_length.is_none() {
        return Err(HttpError::new(411, "a POST needs a Content-Length header"));
    }
    if length > limits.max_body_bytes {
        return Err(HttpError::new(
            413,
            format!(
                "the body of {length} bytes exceeds the limit of {} bytes",
                limits.max_body_bytes
            ),
        ));
    }
    if expect_continue && length > 0 {
        let mut writer = stream;
        writer
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .map_err(|e| read_failure(e, "body"))?;
    }
    let mut body = vec![0u8; length];
    reader
        .read_exact(&mut body)
        .map_err(|e| read_failure(e, "body"))?;
    Ok(Request { method, path, body })
}

/// Reads up to and including the blank line that ends the head; lines end in CRLF (a bare LF is
/// accepted and normalised). Returns the head without its final CRLF CRLF.
fn read_head(reader: &mut impl BufRead, max_bytes: usize) -> Result<String, HttpError> {
    let mut head: Vec<u8> = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        let room = (max_bytes + 2).saturating_sub(head.len()) as u64;
        let n = reader
            .by_ref()
            .take(room)
            .read_until(b'\n', &mut line)
            .map_err(|e| read_failure(e, "headers"))?;
        if n == 0 {
            return Err(HttpError::new(
                400,
                if head.is_empty() {
                    "the connection closed before a request arrived"
                } else {
                    "the connection ended in the middle of the request's headers"
                },
            ));
        }
        if line.last() != Some(&b'\n') {
            return Err(if (n as u64) < room {
                HttpError::new(
                    400,
                    "the connection ended in the middle of the request's headers",
                )
            } else {
                HttpError::new(
                    431,
                    format!("the request line and headers exceed {max_bytes} bytes"),
                )
            });
        }
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        // Tolerate empty lines before the request line, as RFC 9112 asks.
        if line.is_empty() && head.is_empty() {
            continue;
        }
        if line.is_empty() {
            break;
        }
        head.extend_from_slice(&line);
        head.extend_from_slice(b"\r\n");
    }
    head.truncate(head.len().saturating_sub(2));
    String::from_utf8(head).map_err(|_| HttpError::new(400, "the request head is not UTF-8"))
}

/// `METHOD /path?query HTTP/1.1` -> (method, path).
fn parse_request_line(line: &str) -> Result<(String, String), HttpError> {
    let bad = || HttpError::new(400, format!("malformed request line {:?}", clip(line)));
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(bad());
    }
    if !target.starts_with('/') || target.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(bad());
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(HttpError::new(
            400,
            format!("{:?} is not HTTP/1.1 or HTTP/1.0", clip(version)),
        ));
    }
    let path = target.split('?').next().unwrap_or(target);
    Ok((method.to_string(), path.to_string()))
}

/// `Name: value` -> (name, trimmed value).
fn parse_header(line: &str) -> Result<(&str, &str), HttpError> {
    let bad = || HttpError::new(400, format!("malformed header line {:?}", clip(line)));
    let (name, value) = line.split_once(':').ok_or_else(bad)?;
    let is_token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || !name.bytes().all(is_token) {
        return Err(bad());
    }
    Ok((name, value.trim_matches([' ', '\t'])))
}

/// Decimal digits only: no sign, no spaces, no lists.
fn parse_content_length(value: &str) -> Result<usize, HttpError> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HttpError::new(
            400,
            format!("Content-Length {:?} is not a number", clip(value)),
        ));
    }
    // Too many digits for usize is certainly too large a body.
    Ok(value.parse::<usize>().unwrap_or(usize::MAX))
}

/// The first 80 characters of `s`, for messages.
fn clip(s: &str) -> String {
    s.chars().take(80).collect()
}

/// The reason phrase of the statuses this server sends.
fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        417 => "Expectation Failed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// Writes a complete response with a `Content-Length` body.
pub(crate) fn write_response(
    mut out: impl Write,
    status: u16,
    content_type: &str,
    extra_headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n",
        reason(status),
        body.len()
    );
    for (name, value) in extra_headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())?;
    out.write_all(body)?;
    out.flush()
}

/// Writes the head of a server-sent-event stream; the body runs until the connection closes.
pub(crate) fn write_event_stream_head(mut out: impl Write) -> io::Result<()> {
    out.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n\
          Cache-Control: no-cache\r\nConnection: close\r\nX-Accel-Buffering: no\r\n\r\n",
    )?;
    out.flush()
}

/// Writes one server-sent event `data: <data>\n\n` (`data` holds no newline: compact JSON).
pub(crate) fn write_event(mut out: impl Write, data: &str) -> io::Result<()> {
    out.write_all(format!("data: {data}\n\n").as_bytes())?;
    out.flush()
}

/// Whether the peer has closed its side of `stream` (or reset it). Data the client sent beyond
/// its request does not count as closing.
pub(crate) fn peer_closed(stream: &TcpStream) -> bool {
    if stream.set_nonblocking(true).is_err() {
        return true;
    }
    let mut byte = [0u8; 1];
    let closed = match stream.peek(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != io::ErrorKind::WouldBlock,
    };
    stream.set_nonblocking(false).is_err() || closed
}

/// Ends a connection politely: closes our side, then reads and discards what the client still
/// sends (at most `max_bytes`, for at most `max_wait`) so that closing does not reset the
/// connection before the client has read the response.
pub(crate) fn linger_close(stream: &TcpStream, max_bytes: usize, max_wait: Duration) {
    let _ = stream.shutdown(Shutdown::Write);
    let mut drain = DeadlineReader {
        stream,
        deadline: Instant::now() + max_wait,
    };
    let mut buf = [0u8; 16 * 1024];
    let mut seen = 0usize;
    while seen < max_bytes {
        match drain.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => seen += n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines() {
        assert_eq!(
            parse_request_line("POST /v1/completions?x=1 HTTP/1.1").unwrap(),
            ("POST".to_string(), "/v1/completions".to_string())
        );
        for bad in [
            "",
            "GET",
            "GET /",
            "get / HTTP/1.1",
            "GET  / HTTP/1.1",
            "GET http://x/ HTTP/1.1",
            "GET / HTTP/1.1 extra",
            "GET / FTP/1.0",
            "GET / HTTP/2.0",
        ] {
            assert_eq!(parse_request_line(bad).unwrap_err().status, 400, "{bad:?}");
        }
    }

    #[test]
    fn headers_and_lengths() {
        assert_eq!(
            parse_header("Content-Type:  application/json ").unwrap(),
            ("Content-Type", "application/json")
        );
        assert!(parse_header("no colon").is_err());
        assert!(parse_header(" folded: x").is_err());
        assert!(parse_header(": x").is_err());
        assert_eq!(parse_content_length("12").unwrap(), 12);
        assert_eq!(
            parse_content_length("99999999999999999999999999").unwrap(),
            usize::MAX
        );
        for bad in ["", "-1", "+3", "1 2", "0x10", "12,12"] {
            assert!(parse_content_length(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn heads_are_bounded() {
        let mut ok = &b"\r\nGET / HTTP/1.1\nHost: x\r\n\r\nrest"[..];
        assert_eq!(
            read_head(&mut ok, 100).unwrap(),
            "GET / HTTP/1.1\r\nHost: x"
        );
        let long = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(200));
        assert_eq!(
            read_head(&mut long.as_bytes(), 100).unwrap_err().status,
            431
        );
        assert_eq!(
            read_head(&mut &b"GET / HTTP/1.1\r\nHost"[..], 100)
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(read_head(&mut &b""[..], 100).unwrap_err().status, 400);
    }
}
