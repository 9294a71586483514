(* `make bench`, shared heaps: OCamlnet's Netmcore_heap/Netmcore_ref
   against Shmpool_netmcore's, in the same run, alternating rounds. Each
   measurement runs in Netmcore workers (started with `All) that time
   themselves on a heap of their own, in a pool the master created; the
   median of the rounds is reported. Prints a markdown table to -o. *)

module type IMPL = sig
  val create_mempool : ?alloc_really:bool -> int -> Netmcore.res_id
  val unlink_mempool : Netmcore.res_id -> unit
  val shm_name : Netmcore.res_id -> string

  type 'a heap
  type mutator

  val create_heap : Netmcore.res_id -> int -> 'a -> 'a heap
  val root : 'a heap -> 'a
  val modify : 'a heap -> (mutator -> 'r) -> 'r
  val add : mutator -> 'a -> 'a
  val gc : 'a heap -> unit
  val destroy : 'a heap -> unit

  type 't sref

  val sref : Netmcore.res_id -> 't -> 't sref
  val assign : 't sref -> 't -> unit
  val deref_ro : 't sref -> 't
  val sref_destroy : 't sref -> unit
end

module Orig : IMPL = struct
  include Netmcore_mempool
  include Netmcore_heap
  include Netmcore_ref

  let sref_destroy r = destroy (heap r)
end

module Ours : IMPL = struct
  include Shmpool_netmcore.Netmcore_mempool
  include Shmpool_netmcore.Netmcore_heap
  include Shmpool_netmcore.Netmcore_ref

  let sref_destroy r = destroy (heap r)
end

open Benchutil

let () = parse_side ~out:"bench-heap.md" ~usage:"bench_heap [options]"

type kind = List10 | String10k | Assign | Deref | Gc_garbage
type case = { name : string; kind : kind; workers : int; per_op : bool }

let cases =
  [
    { name = "modify + add, 10-int list"; kind = List10; workers = 1; per_op = false };
    { name = "modify + add, 10 KB string"; kind = String10k; workers = 1; per_op = false };
    { name = "sref assign + deref_ro, small value"; kind = Assign; workers = 1; per_op = false };
    { name = "deref_ro"; kind = Deref; workers = 1; per_op = false };
    { name = "gc, 1000 live cells + 20000 garbage lists (s/gc)"; kind = Gc_garbage; workers = 1; per_op = true };
    { name = "modify + add, 10-int list, 2 workers, 2 heaps"; kind = List10; workers = 2; per_op = false };
  ]

(* (operations, seconds timed) *)
module Work (I : IMPL) = struct
  let run pool kind dur =
    match kind with
    | List10 | String10k ->
        let h = I.create_heap pool 65536 (ref (Obj.repr 0)) in
        let v = if kind = List10 then Obj.repr (List.init 10 Fun.id) else Obj.repr (String.make 10_000 'x') in
        ignore (timed 0.05 (fun _ -> I.modify h (fun m -> I.root h := I.add m v)));
        let r = timed dur (fun _ -> I.modify h (fun m -> I.root h := I.add m v)) in
        I.destroy h;
        r
    | Assign ->
        let s = I.sref pool (0, "x") in
        let r = timed dur (fun i -> I.assign s (i, "x"); ignore (Sys.opaque_identity (I.deref_ro s))) in
        I.sref_destroy s;
        r
    | Deref ->
        let s = I.sref pool (0, "x") in
        let r = timed dur (fun _ -> ignore (Sys.opaque_identity (I.deref_ro s))) in
        I.sref_destroy s;
        r
    | Gc_garbage ->
        let h = I.create_heap pool 65536 (ref []) in
        I.modify h (fun m -> I.root h := I.add m (List.init 1000 Fun.id));
        let n = ref 0 and t = ref 0. and t_end = now () +. dur in
        while now () < t_end || !n = 0 do
          I.modify h (fun m ->
              for _ = 1 to 20_000 do
                ignore (I.add m (List.init 10 Fun.id))
              done);
          let t0 = now () in
          I.gc h;
          t := !t +. (now () -. t0);
          incr n
        done;
        I.destroy h;
        (!n, !t)
end

module W_orig = Work (Orig)
module W_ours = Work (Ours)

let worker (ours, pool, kind, dur) =
  try Ok ((if ours then W_ours.run else W_orig.run) pool kind dur) with e -> Error (Printexc.to_string e)

let worker_fork, worker_join = Netmcore_process.def_process worker

(* per case, per implementation: the figure of each round (ops/s, or s/op) *)
let coordinator (orig_pool, ours_pool, nrounds, dur) =
  List.map
    (fun c ->
      let measure ours =
        let pool = if ours then ours_pool else orig_pool in
        let ws =
          List.init c.workers (fun _ ->
              Netmcore_process.start ~inherit_resources:`All worker_fork (ours, pool, c.kind, dur))
        in
        let rs = List.map (Netmcore_process.join worker_join) ws in
        List.fold_left
          (fun acc r ->
            match (acc, r) with
            | Error e, _ -> Error e
            | _, (None | Some (Error _)) ->
                Error (match r with Some (Error e) -> e | _ -> "worker died")
            | Ok s, Some (Ok (n, t)) ->
                Ok (s +. if c.per_op then t /. float n else float n /. t))
          (Ok 0.) rs
      in
      let o, u, errs = alternate nrounds measure in
      Printf.eprintf "  %s done\n%!" c.name;
      (c, o, u, errs))
    cases

let coord_fork, coord_join = Netmcore_process.def_process coordinator

let fmt c v =
  if Float.is_nan v then "—"
  else if c.per_op then
    if v < 1e-3 then Printf.sprintf "%.1f µs" (v *. 1e6) else Printf.sprintf "%.2f ms" (v *. 1e3)
  else if v >= 1e6 then Printf.sprintf "%.2f M/s" (v /. 1e6)
  else Printf.sprintf "%.0f k/s" (v /. 1e3)

let () =
  let res = run_on_two_pools ~name:"bench-heap" ~bytes:(256 * 1024 * 1024) coord_fork coord_join in
  let oc = open_out !out_md in
  let p fmt = Printf.fprintf oc fmt in
  p "| case | OCamlnet 4.1.9 | shmpool | speed-up | goal |\n|---|---:|---:|---:|---|\n";
  let one_worker = ref nan in
  List.iter
    (fun (c, o, u, errs) ->
      let mo = median o and mu = median u in
      let speed = if c.per_op then mo /. mu else mu /. mo in
      if c.kind = List10 && c.workers = 1 then one_worker := mu;
      let goal =
        match c.kind with
        | Deref -> "≥ 1× (reads no slower)"
        | Gc_garbage -> ""
        | _ when c.workers = 2 ->
            Printf.sprintf "≥ 1.6× one worker: %.2f×" (mu /. !one_worker)
        | _ -> "≥ 3× (writes)"
      in
      p "| %s | %s | %s | %.1f× | %s |\n" c.name (fmt c mo) (fmt c mu) speed goal;
      List.iter (fun e -> p "|  error: %s | | | | |\n" e) errs)
    res;
  close_out oc
