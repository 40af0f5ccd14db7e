//! Real servers on loopback for remote-source tests: moto's S3 server and nginx, each started
//! on a free port, bounded in time and killed by pid (with the test, if it dies first). The same
//! servers as `tests/remote.rs` starts, shared here so that other test files use them too.
#![allow(dead_code)]

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::common::{run, sh};

pub const BUCKET: &str = "bkt";

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn wait_for_port(port: u16, child: &mut Child, what: &str, log: &Path) {
    let end = Instant::now() + Duration::from_secs(30);
    while Instant::now() < end {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "{what} exited ({st}) before listening: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what} did not listen on port {port} within 30 s");
}

pub fn have(cmd: &str) -> bool {
    Command::new("bash")
        .arg("-c")
        .arg(format!("command -v {cmd}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The server is killed with the test's thread if the test dies before its Drop runs.
pub fn die_with_test(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

pub fn signal(child: &Child, sig: i32) {
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(child.id() as i32, sig) };
}

// ---------------------------------------------------------------------------------------------
// moto (S3)

pub const PY_SETUP: &str = r#"
import json, sys, boto3
ep, auth, bucket = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
kid, sec = "testing", "testing"
if auth:
    iam = boto3.client("iam", endpoint_url=ep, region_name="us-east-1",
                       aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
    iam.create_user(UserName="hsm")
    iam.put_user_policy(UserName="hsm", PolicyName="all", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    k = iam.create_access_key(UserName="hsm")["AccessKey"]
    kid, sec = k["AccessKeyId"], k["SecretAccessKey"]
s3 = boto3.client("s3", endpoint_url=ep, region_name="us-east-1",
                  aws_access_key_id=kid, aws_secret_access_key=sec)
s3.create_bucket(Bucket=bucket)
print(json.dumps({"id": kid, "secret": sec}))
"#;

pub const PY_PUT: &str = r#"
import json, sys, boto3
from boto3.s3.transfer import TransferConfig
ep, kid, sec, bucket = sys.argv[1:5]
s3 = boto3.client("s3", endpoint_url=ep, region_name="us-east-1",
                  aws_access_key_id=kid, aws_secret_access_key=sec)
cfg = TransferConfig(multipart_threshold=8 << 30, max_concurrency=1)
for key, path in json.load(sys.stdin):
    s3.upload_file(path, bucket, key, Config=cfg)
"#;

/// A moto server in S3 mode. With `auth`, it checks SigV4 signatures against an IAM user made at
/// start. (moto 5.x miscomputes signatures of query strings holding `/` and of keys holding `+`,
/// so authenticated tests list the bucket root and avoid `+` in keys.)
pub struct Moto {
    pub child: Child,
    pub port: u16,
    pub id: String,
    pub secret: String,
    pub dir: PathBuf,
}

impl Moto {
    pub fn start(dir: &Path, auth: bool) -> Moto {
        assert!(
            have("moto_server"),
            "moto_server not found: pip install 'moto[server]' (.ci/run does)"
        );
        let dir = dir.join(format!("moto-{}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let log = dir.join("moto.log");
        let mut cmd = Command::new("moto_server");
        cmd.args(["-H", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.join("moto.err")).unwrap());
        if auth {
            cmd.env("INITIAL_NO_AUTH_ACTION_COUNT", "3");
        }
        let mut child = die_with_test(&mut cmd).spawn().expect("spawn moto_server");
        wait_for_port(port, &mut child, "moto_server", &dir.join("moto.err"));
        let mut m = Moto {
            child,
            port,
            id: String::new(),
            secret: String::new(),
            dir,
        };
        let out = run(Command::new("python3")
            .arg("-c")
            .arg(PY_SETUP)
            .arg(m.endpoint())
            .arg(if auth { "1" } else { "0" })
            .arg(BUCKET));
        let keys: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        m.id = keys["id"].as_str().unwrap().to_string();
        m.secret = keys["secret"].as_str().unwrap().to_string();
        m
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Upload local files as objects (one PUT each, so ETags are MD5s).
    pub fn put(&self, items: &[(&str, &Path)]) {
        s3_put(&self.endpoint(), &self.id, &self.secret, items);
    }

    pub fn put_bytes(&self, key: &str, data: &[u8]) {
        let p = self.dir.join(format!("obj-{}", rand::random::<u32>()));
        std::fs::write(&p, data).unwrap();
        self.put(&[(key, &p)]);
        std::fs::remove_file(&p).unwrap();
    }

    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", self.id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret.clone()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }
}

/// Upload local files as objects of BUCKET at an S3 endpoint (one PUT each).
const PY_DELETE: &str = r#"
import sys, boto3
ep, kid, sec, bucket = sys.argv[1:5]
s3 = boto3.client("s3", endpoint_url=ep, region_name="us-east-1",
                  aws_access_key_id=kid, aws_secret_access_key=sec)
for key in sys.argv[5:]:
    s3.delete_object(Bucket=bucket, Key=key)
"#;

impl Moto {
    /// Delete objects.
    pub fn delete(&self, keys: &[&str]) {
        run(Command::new("python3")
            .arg("-c")
            .arg(PY_DELETE)
            .args([&self.endpoint(), &self.id, &self.secret, BUCKET])
            .args(keys));
    }
}

pub fn s3_put(endpoint: &str, id: &str, secret: &str, items: &[(&str, &Path)]) {
    let json = serde_json::to_string(
        &items
            .iter()
            .map(|(k, p)| (k.to_string(), p.to_string_lossy().into_owned()))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(PY_PUT)
        .args([endpoint, id, secret, BUCKET])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(json.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "upload failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Drop for Moto {
    fn drop(&mut self) {
        signal(&self.child, libc::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub struct Nginx {
    pub child: Option<Child>,
    pub port: u16,
    /// With TLS: the server's certificate and key (signed by a throw-away CA).
    tls: Option<(PathBuf, PathBuf)>,
    /// A reverse proxy to this loopback port instead of serving files.
    proxy_to: Option<u16>,
    dir: PathBuf,
    pub root: PathBuf,
    pub fail_flag: PathBuf,
}

impl Nginx {
    pub fn start(scratch: &Path) -> Nginx {
        assert!(
            Path::new("/usr/sbin/nginx").exists() || have("nginx"),
            "nginx not found: apt-get install nginx-light (.ci/run does)"
        );
        let dir = scratch.join(format!("nginx-{}", rand::random::<u32>()));
        let root = dir.join("www");
        std::fs::create_dir_all(root.clone()).unwrap();
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        let mut n = Nginx {
            child: None,
            port: free_port(),
            tls: None,
            proxy_to: None,
            fail_flag: dir.join("fail503"),
            dir,
            root,
        };
        n.launch();
        n
    }

    /// nginx over TLS, offering HTTP/2 and HTTP/1.1 (ALPN); returns it and the CA certificate
    /// that signed its certificate.
    pub fn start_tls(scratch: &Path) -> (Nginx, PathBuf) {
        let dir = scratch.join(format!("pki-{}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = |n: &str| dir.join(n).to_string_lossy().into_owned();
        sh(&format!(
            "set -e; cd {d}
             openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 \
               -subj /CN=hsm-test-ca 2>/dev/null
             openssl req -newkey rsa:2048 -nodes -keyout srv.key -out srv.csr -subj /CN=127.0.0.1 2>/dev/null
             printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > ext
             openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out srv.pem \
               -days 2 -extfile ext 2>/dev/null",
            d = dir.display()
        ));
        let mut n = Nginx::start(scratch);
        n.kill();
        n.tls = Some((PathBuf::from(p("srv.pem")), PathBuf::from(p("srv.key"))));
        n.launch();
        (n, PathBuf::from(p("ca.pem")))
    }

    pub fn launch(&mut self) {
        let listen = match &self.tls {
            Some((cert, key)) => format!(
                "listen 127.0.0.1:{} ssl http2; ssl_certificate {}; ssl_certificate_key {};",
                self.port,
                cert.display(),
                key.display()
            ),
            None => format!("listen 127.0.0.1:{};", self.port),
        };
        let d = self.dir.display();
        let serve = match self.proxy_to {
            Some(p) => format!(
                "proxy_pass http://127.0.0.1:{p}; proxy_set_header Host $http_host; \
                 proxy_buffering off; client_max_body_size 0;"
            ),
            None => String::new(),
        };
        let conf = format!(
            "daemon off; master_process off; worker_processes 1;
pid {d}/nginx.pid; error_log {d}/error.log;
events {{ worker_connections 256; }}
http {{
  log_format hsm '$remote_addr [$time_local] \"$request\" $status $body_bytes_sent conn=$connection';
  access_log {d}/access.log hsm;
  client_body_temp_path {d}/tmp/body; proxy_temp_path {d}/tmp/proxy;
  fastcgi_temp_path {d}/tmp/fastcgi; uwsgi_temp_path {d}/tmp/uwsgi; scgi_temp_path {d}/tmp/scgi;
  default_type application/octet-stream;
  server {{
    {listen}
    root {d}/www;
    location / {{ if (-f {d}/fail503) {{ return 503; }} {serve} }}
  }}
}}
"
        );
        let conf_path = self.dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let log = self.dir.join("stderr.log");
        let mut cmd = Command::new("nginx");
        cmd.arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let mut child = die_with_test(&mut cmd).spawn().expect("spawn nginx");
        wait_for_port(self.port, &mut child, "nginx", &log);
        self.child = Some(child);
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end && TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// nginx as a reverse proxy in front of another loopback server.
    pub fn start_proxy(scratch: &Path, to: u16) -> Nginx {
        let mut n = Nginx::start(scratch);
        n.kill();
        n.proxy_to = Some(to);
        n.launch();
        n
    }

    pub fn base(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}/", self.port)
    }

    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }

    /// Wait (bounded) until it has answered `n` requests with 503.
    pub fn wait_503s(&self, n: usize) {
        let end = Instant::now() + Duration::from_secs(30);
        while self.access_log().matches(" 503 ").count() < n {
            assert!(
                Instant::now() < end,
                "fewer than {n} 503 answers in 30 s:\n{}",
                self.access_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
