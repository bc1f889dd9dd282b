//! A hello function in Rust with no dependencies: an HTTP/1.1 server on `$PORT` that greets
//! every request. Mecha runs it from examples/hello-rust/service.yaml.
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};

fn main() -> std::io::Result<()> {
    let port = std::env::var("PORT").unwrap_or_else(|_| "8080".into());
    let target = std::env::var("TARGET").unwrap_or_else(|_| "World".into());
    let revision = std::env::var("K_REVISION").unwrap_or_else(|_| "unknown".into());
    let listener = TcpListener::bind(("127.0.0.1", port.parse().unwrap_or(8080)))?;
    println!("hello-rust listening on {port}");
    let greeting = format!(
        "Hello {target}! (revision {revision}, pid {})\n",
        std::process::id()
    );
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let greeting = greeting.clone();
        std::thread::spawn(move || {
            if let Err(error) = serve(stream, &greeting) {
                eprintln!("connection error: {error}");
            }
        });
    }
    Ok(())
}

/// Answers each request on a keep-alive connection until the client closes it.
fn serve(stream: TcpStream, greeting: &str) -> std::io::Result<()> {
    // One write per response and no Nagle delay: a response split over several small writes
    // would otherwise wait for the client's delayed ACK.
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    loop {
        let mut content_length = 0usize;
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 {
                return Ok(());
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                content_length = value.trim().parse().unwrap_or(0);
            }
        }
        // Discard the request body.
        std::io::copy(
            &mut (&mut reader).take(content_length as u64),
            &mut std::io::sink(),
        )?;
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\r\n{greeting}",
            greeting.len()
        );
        writer.write_all(response.as_bytes())?;
    }
}
