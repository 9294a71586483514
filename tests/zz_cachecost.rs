mod common;
use common::*;
use std::time::Instant;
#[test]
fn cache_path_cost() {
    let p = anon(4096);
    let pg = p.geometry().page_size;
    let ring: Vec<usize> = (0..8).map(|_| p.alloc(pg).unwrap()).collect();
    drop(ring);
    let mut best = f64::MAX;
    for _ in 0..9 {
        let n = 2_000_000;
        let t = Instant::now();
        for _ in 0..n {
            let o = p.alloc(pg).unwrap();
            p.free(o).unwrap();
        }
        best = best.min(t.elapsed().as_nanos() as f64 / n as f64);
    }
    println!("CACHECOST {best:.1} ns per cached alloc+free pair");
}
