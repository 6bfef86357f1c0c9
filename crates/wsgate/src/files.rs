//! Static files: a route with `static = "dir"` serves that directory's files
//! (`GET` and `HEAD`), with their content type, an `ETag` and `304 Not
//! Modified` for a matching `If-None-Match`.
//!
//! Nothing outside the directory is ever served: the request path, past the
//! route's prefix (`/app` takes `/app/…`, never `/appx`), is percent-decoded
//! and refused (404) if a segment is `..`, `.`, empty in the middle, or
//! holds a backslash or NUL; the file found is
//! canonicalised and must still lie inside the canonical directory, so a
//! symlink pointing out of the tree is a 404 too. A directory is served by
//! its `index.html` or not at all: no listings.

use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Method, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use tokio::io::AsyncReadExt;

use crate::error::{Error, Kind};
use crate::http::{empty, full, Body, BoxError};

/// Files up to this size are read whole; larger ones are streamed.
const READ_WHOLE: u64 = 1 << 20;
/// Bytes read at a time when streaming.
const CHUNK: usize = 64 * 1024;

/// The content type of a file, by its extension.
pub fn content_type(path: &Path) -> &'static str {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("html" | "htm") => "text/html; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("json" | "map") => "application/json",
        Some("txt") => "text/plain; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        Some("ico") => "image/x-icon",
        Some("wasm") => "application/wasm",
        Some("woff2") => "font/woff2",
        Some("woff") => "font/woff",
        _ => "application/octet-stream",
    }
}

/// Decodes `%XX` escapes; `None` for a bad escape or bytes that are not
/// UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3)?;
            let v = u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The relative file path a request path names under a route's prefix, or
/// `None` when it tries to leave the directory (or cannot be a file name).
pub fn relative_path(request_path: &str, prefix: &str) -> Option<PathBuf> {
    let rest = request_path.strip_prefix(prefix)?;
    // The prefix ends at a segment: `/app` serves `/app/x`, never `/appx`.
    if !(rest.is_empty() || rest.starts_with('/')) {
        return None;
    }
    let decoded = percent_decode(rest)?;
    let mut out = PathBuf::new();
    let segments: Vec<&str> = decoded.split('/').collect();
    for (i, seg) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        if seg.is_empty() {
            // A leading slash, or a trailing one (a directory): fine.
            if i == 0 || last {
                continue;
            }
            return None;
        }
        if *seg == "." || *seg == ".." || seg.contains(['\\', '\0']) {
            return None;
        }
        out.push(seg);
    }
    Some(out)
}

fn not_found() -> Error {
    Error::client(Kind::NoRoute, "not found")
}

/// The weak validator of a file: its length and modification time.
fn etag(meta: &std::fs::Metadata) -> String {
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    format!("\"{:x}-{:x}\"", meta.len(), mtime)
}

/// Whether `If-None-Match` names `tag` (or is `*`).
fn none_match(head: &Parts, tag: &str) -> bool {
    head.headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == "*" || t == tag)
}

/// Answers a request for a file of `root` under the route's `prefix`.
pub async fn serve(root: &Path, prefix: &str, head: &Parts) -> Result<Response<Body>, Error> {
    if head.method != Method::GET && head.method != Method::HEAD {
        return Err(Error::client(
            Kind::MethodNotAllowed,
            "a static route serves GET and HEAD",
        ));
    }
    let rel = relative_path(head.uri.path(), prefix).ok_or_else(not_found)?;
    let root = tokio::fs::canonicalize(root)
        .await
        .map_err(|_| not_found())?;
    let mut path = root.join(&rel);
    let mut meta = tokio::fs::metadata(&path).await.map_err(|_| not_found())?;
    if meta.is_dir() {
        path.push("index.html");
        meta = tokio::fs::metadata(&path).await.map_err(|_| not_found())?;
    }
    // Symlinks are followed only while they stay in the tree.
    let real = tokio::fs::canonicalize(&path)
        .await
        .map_err(|_| not_found())?;
    if !real.starts_with(&root) || !meta.is_file() {
        return Err(not_found());
    }
    let tag = etag(&meta);
    let mut resp = Response::builder()
        .header(header::CONTENT_TYPE, content_type(&real))
        .header(header::CACHE_CONTROL, "no-cache")
        .header(header::ETAG, &tag);
    if none_match(head, &tag) {
        return Ok(resp
            .status(StatusCode::NOT_MODIFIED)
            .body(empty())
            .expect("valid response"));
    }
    resp = resp.header(header::CONTENT_LENGTH, HeaderValue::from(meta.len()));
    let body = if head.method == Method::HEAD {
        empty()
    } else if meta.len() <= READ_WHOLE {
        full(tokio::fs::read(&real).await.map_err(|_| not_found())?)
    } else {
        let file = tokio::fs::File::open(&real)
            .await
            .map_err(|_| not_found())?;
        stream(file)
    };
    Ok(resp.body(body).expect("valid response"))
}

/// A file's bytes as a body, read a chunk at a time as the client takes it.
fn stream(file: tokio::fs::File) -> Body {
    let chunks = futures_util::stream::unfold(file, |mut f| async move {
        let mut buf = vec![0u8; CHUNK];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(http_body::Frame::data(Bytes::from(buf))), f))
            }
            Err(e) => Some((Err(Box::new(e) as BoxError), f)),
        }
    });
    StreamBody::new(chunks).boxed_unsync()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_never_leave_the_directory() {
        let ok = |p: &str| relative_path(p, "/app").map(|p| p.display().to_string());
        assert_eq!(ok("/app/index.html").as_deref(), Some("index.html"));
        assert_eq!(ok("/app/js/m.mjs").as_deref(), Some("js/m.mjs"));
        assert_eq!(ok("/app/").as_deref(), Some(""));
        assert_eq!(ok("/app").as_deref(), Some(""));
        assert_eq!(ok("/app/a%20b.txt").as_deref(), Some("a b.txt"));
        for bad in [
            "/app/../etc/passwd",
            "/app/%2e%2e/etc/passwd",
            "/app/%2E%2E%2Fetc",
            "/app/a/../../x",
            "/app/./x",
            "/app/a//b",
            "/app/a%00b",
            "/app/a%5c..%5cb",
            "/app/%zz",
            "/app/%ff",
            "/other/x",
            "/appx.txt",
            "/app..",
            "/app%2fx",
            "/app%2f..%2fx",
        ] {
            assert_eq!(ok(bad), None, "{bad}");
        }
    }

    fn get(path: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::get(path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[tokio::test]
    async fn files_types_etags_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("site");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("index.html"), "<h1>hi</h1>").unwrap();
        std::fs::write(root.join("app.mjs"), "export {}").unwrap();
        std::fs::write(
            root.join("sub/data.bin"),
            vec![7u8; (READ_WHOLE + 5) as usize],
        )
        .unwrap();
        std::fs::write(dir.path().join("secret.txt"), "secret").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret.txt"), root.join("leak.txt")).unwrap();
        std::os::unix::fs::symlink(root.join("app.mjs"), root.join("inside.mjs")).unwrap();

        let r = serve(&root, "/app", &get("/app/", &[])).await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "text/html; charset=utf-8");
        let tag = r.headers()["etag"].to_str().unwrap().to_string();
        let body = r.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"<h1>hi</h1>");
        let r = serve(
            &root,
            "/app",
            &get("/app/index.html", &[("if-none-match", &tag)]),
        )
        .await
        .unwrap();
        assert_eq!(r.status(), 304);
        let r = serve(&root, "/app", &get("/app/app.mjs", &[]))
            .await
            .unwrap();
        assert_eq!(
            r.headers()["content-type"],
            "text/javascript; charset=utf-8"
        );
        let r = serve(&root, "/app", &get("/app/inside.mjs", &[]))
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "a symlink inside the tree is served");
        let r = serve(&root, "/app", &get("/app/sub/data.bin", &[]))
            .await
            .unwrap();
        assert_eq!(
            r.headers()["content-length"],
            (READ_WHOLE + 5).to_string().as_str()
        );
        let body = r.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body.len() as u64, READ_WHOLE + 5, "streamed whole");
        for bad in [
            "/app/leak.txt",
            "/app/sub",
            "/app/nope",
            "/app/%2e%2e/secret.txt",
        ] {
            let e = serve(&root, "/app", &get(bad, &[])).await.unwrap_err();
            assert_eq!(e.kind.status(), 404, "{bad}");
        }
        let post = http::Request::post("/app/")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        let e = serve(&root, "/app", &post).await.unwrap_err();
        assert_eq!(e.kind.status(), 405);
    }
}
