//! A subscriber of the test's own: a keep-alive HTTP/1.1 server on 127.0.0.1 that records
//! every request and answers as told.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// One request a subscriber received.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub headers: BTreeMap<String, String>,
    pub body: String,
    pub at: Instant,
}

pub type Answer = (u16, Vec<(String, String)>, String);
type Behaviour = Arc<dyn Fn(&Received) -> Answer + Send + Sync>;

/// A keep-alive HTTP/1.1 subscriber that records every request and answers as told.
#[derive(Debug)]
pub struct Subscriber {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<Received>>>,
}

impl Subscriber {
    pub fn start(behaviour: impl Fn(&Received) -> Answer + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let behaviour: Behaviour = Arc::new(behaviour);
        let log = received.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let (log, behaviour) = (log.clone(), behaviour.clone());
                std::thread::spawn(move || serve(stream, &log, &behaviour));
            }
        });
        Self { addr, received }
    }

    pub fn ok() -> Self {
        Self::start(|_| (202, vec![], String::new()))
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn all(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    pub fn count(&self, path: &str) -> usize {
        self.all().iter().filter(|r| r.path == path).count()
    }
}

fn serve(stream: TcpStream, log: &Mutex<Vec<Received>>, behaviour: &Behaviour) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
        let mut headers = BTreeMap::new();
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((k, v)) = header.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let length = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let request = Received {
            path,
            headers,
            body: String::from_utf8_lossy(&body).to_string(),
            at: Instant::now(),
        };
        log.lock().unwrap().push(request.clone());
        let (status, extra, body) = behaviour(&request);
        let mut response = format!("HTTP/1.1 {status} X\r\nContent-Length: {}\r\n", body.len());
        for (k, v) in extra {
            response.push_str(&format!("{k}: {v}\r\n"));
        }
        response.push_str("\r\n");
        response.push_str(&body);
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}
