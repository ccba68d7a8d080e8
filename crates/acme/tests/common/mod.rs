//! What the Pebble tests share: a Pebble validating HTTP-01 against our solver on loopback.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use leasehold_acme::{Directory, Http01Solver, TrustRoots};
use leasehold_testkit::{PebbleOptions, PebbleServer};

pub struct Fixture {
    pub pebble: PebbleServer,
    pub solver: Arc<Http01Solver>,
    pub directory: Directory,
}

pub async fn fixture(options: PebbleOptions) -> Fixture {
    let addr: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let solver = Http01Solver::bind(addr).await.expect("solver binds");
    let pebble = PebbleServer::start(PebbleOptions {
        http_port: solver.local_addr().port(),
        ..options
    })
    .await;
    let directory = Directory {
        url: pebble.directory_url(),
        trust: TrustRoots::Pem(pebble.ca_pem().to_owned()),
    };
    Fixture {
        pebble,
        solver: Arc::new(solver),
        directory,
    }
}
