(* `make bench`, shared structures: OCamlnet's Netmcore_hashtbl, _array,
   _queue and _mutex against Shmpool_netmcore's, in the same run,
   alternating rounds. Each figure is measured inside Netmcore workers
   (started with `All) on structures the coordinator created in a pool the
   master created, attached by descriptor: 1 worker; 2 workers on one
   structure; 2 workers on a structure each. Median of the rounds; prints
   a markdown table to -o. *)

module type IMPL = sig
  val create_mempool : ?alloc_really:bool -> int -> Netmcore.res_id
  val unlink_mempool : Netmcore.res_id -> unit
  val shm_name : Netmcore.res_id -> string

  module T : sig
    type ('a, 'b, 'h) t
    type ('a, 'b, 'h) t_descr

    val create : Netmcore.res_id -> 'h -> ('a, 'b, 'h) t
    val add : ('a, 'b, 'h) t -> 'a -> 'b -> unit
    val replace : ('a, 'b, 'h) t -> 'a -> 'b -> unit
    val find_ro : ('a, 'b, 'h) t -> 'a -> 'b
    val clear : ('a, 'b, 'h) t -> unit
    val descr_of_hashtbl : ('a, 'b, 'h) t -> ('a, 'b, 'h) t_descr
    val hashtbl_of_descr : Netmcore.res_id -> ('a, 'b, 'h) t_descr -> ('a, 'b, 'h) t
  end

  module A : sig
    type ('e, 'h) sarray
    type ('e, 'h) sarray_descr

    val make : Netmcore.res_id -> int -> 'e -> 'h -> ('e, 'h) sarray
    val set : ('e, _) sarray -> int -> 'e -> unit
    val get_ro : ('e, _) sarray -> int -> 'e
    val header : (_, 'h) sarray -> 'h
    val descr_of_sarray : ('e, 'h) sarray -> ('e, 'h) sarray_descr
    val sarray_of_descr : Netmcore.res_id -> ('e, 'h) sarray_descr -> ('e, 'h) sarray
  end

  module Q : sig
    type ('e, 'h) squeue
    type ('e, 'h) squeue_descr

    val create : Netmcore.res_id -> 'h -> ('e, 'h) squeue
    val push : 'e -> ('e, 'h) squeue -> unit
    val pop_p : ('e, 'h) squeue -> ('e -> 'a) -> 'a
    val descr_of_squeue : ('e, 'h) squeue -> ('e, 'h) squeue_descr
    val squeue_of_descr : Netmcore.res_id -> ('e, 'h) squeue_descr -> ('e, 'h) squeue
  end

  type mutex

  val dummy_mutex : unit -> mutex
  val mutex_in : ('e, mutex array) A.sarray -> unit
  val lock : mutex -> unit
  val unlock : mutex -> unit
end

module Orig : IMPL = struct
  include Netmcore_mempool
  module T = Netmcore_hashtbl
  module A = Netmcore_array
  module Q = Netmcore_queue

  type mutex = Netmcore_mutex.mutex

  let dummy_mutex = Netmcore_mutex.dummy
  let mutex_in a = Netmcore_heap.modify (A.heap a) (fun m -> (A.header a).(0) <- Netmcore_mutex.create m `Normal)
  let lock = Netmcore_mutex.lock
  let unlock = Netmcore_mutex.unlock
end

module Ours : IMPL = struct
  open Shmpool_netmcore
  include Netmcore_mempool
  module T = Netmcore_hashtbl
  module A = Netmcore_array
  module Q = Netmcore_queue

  type mutex = Netmcore_mutex.mutex

  let dummy_mutex = Netmcore_mutex.dummy
  let mutex_in a = Netmcore_heap.modify (A.heap a) (fun m -> (A.header a).(0) <- Netmcore_mutex.create m `Normal)
  let lock = Netmcore_mutex.lock
  let unlock = Netmcore_mutex.unlock
end

open Benchutil

let () = parse_side ~out:"bench-structs.md" ~usage:"bench_structs [options]"

type kind = Add | Replace | Find | Array_rw | Queue | Mutex
type sharing = One | Shared | Separate

let kinds =
  [ (Add, "hashtbl add"); (Replace, "hashtbl replace"); (Find, "hashtbl find_ro"); (Array_rw, "array set + get_ro");
    (Queue, "queue push + pop_p"); (Mutex, "mutex lock + unlock") ]

let sharings = [ (One, "1 worker"); (Shared, "2 workers, one structure"); (Separate, "2 workers, a structure each") ]

(* Descriptors of the structures of one measurement, for either
   implementation (the worker casts back to its implementation's types). *)
type target = { tbl : Obj.t; arr : Obj.t; que : Obj.t }

module Work (I : IMPL) = struct
  let make pool kind =
    match kind with
    | Add | Replace | Find ->
        let t : (int, string, unit) I.T.t = I.T.create pool () in
        if kind = Find then for k = 0 to 1023 do I.T.add t k "v" done;
        { tbl = Obj.repr (I.T.descr_of_hashtbl t); arr = Obj.repr 0; que = Obj.repr 0 }
    | Array_rw | Mutex ->
        let a : (string, I.mutex array) I.A.sarray = I.A.make pool 1024 "v" [| I.dummy_mutex () |] in
        if kind = Mutex then I.mutex_in a;
        { tbl = Obj.repr 0; arr = Obj.repr (I.A.descr_of_sarray a); que = Obj.repr 0 }
    | Queue ->
        let q : (int, unit) I.Q.squeue = I.Q.create pool () in
        { tbl = Obj.repr 0; arr = Obj.repr 0; que = Obj.repr (I.Q.descr_of_squeue q) }

  (* Adds go to 65536 keys at most between two clears, so that a table
     does not outgrow the pool in long runs (one clear per 65536 adds). *)
  let run pool kind tg dur =
    match kind with
    | Add ->
        let t : (int, string, unit) I.T.t = I.T.hashtbl_of_descr pool (Obj.obj tg.tbl) in
        timed dur (fun i -> if i land 65535 = 65535 then I.T.clear t; I.T.add t i "v")
    | Replace ->
        let t : (int, string, unit) I.T.t = I.T.hashtbl_of_descr pool (Obj.obj tg.tbl) in
        timed dur (fun i -> I.T.replace t (i land 1023) "v")
    | Find ->
        let t : (int, string, unit) I.T.t = I.T.hashtbl_of_descr pool (Obj.obj tg.tbl) in
        timed dur (fun i -> ignore (Sys.opaque_identity (I.T.find_ro t (i land 1023))))
    | Array_rw ->
        let a : (string, I.mutex array) I.A.sarray = I.A.sarray_of_descr pool (Obj.obj tg.arr) in
        timed dur (fun i -> I.A.set a (i land 1023) "w"; ignore (Sys.opaque_identity (I.A.get_ro a ((i + 7) land 1023))))
    | Queue ->
        let q : (int, unit) I.Q.squeue = I.Q.squeue_of_descr pool (Obj.obj tg.que) in
        timed dur (fun i -> I.Q.push i q; ignore (Sys.opaque_identity (I.Q.pop_p q Fun.id)))
    | Mutex ->
        let a : (string, I.mutex array) I.A.sarray = I.A.sarray_of_descr pool (Obj.obj tg.arr) in
        let m = (I.A.header a).(0) in
        timed dur (fun _ -> I.lock m; I.unlock m)
end

module W_orig = Work (Orig)
module W_ours = Work (Ours)

let worker (ours, pool, kind, tg, dur) =
  try Ok ((if ours then W_ours.run else W_orig.run) pool kind tg dur) with e -> Error (Printexc.to_string e)

let worker_fork, worker_join = Netmcore_process.def_process worker

let coordinator (orig_pool, ours_pool, nrounds, dur) =
  List.concat_map
    (fun (kind, kname) ->
      List.map
        (fun (sharing, sname) ->
          let measure ours =
            let pool = if ours then ours_pool else orig_pool in
            let make () = if ours then W_ours.make pool kind else W_orig.make pool kind in
            let t1 = make () in
            let tgs = match sharing with One -> [ t1 ] | Shared -> [ t1; t1 ] | Separate -> [ t1; make () ] in
            let ws = List.map (fun tg -> Netmcore_process.start ~inherit_resources:`All worker_fork (ours, pool, kind, tg, dur)) tgs in
            let rs = List.map (Netmcore_process.join worker_join) ws in
            List.fold_left
              (fun acc r ->
                match (acc, r) with
                | Error e, _ -> Error e
                | _, Some (Ok (n, t)) -> Result.map (fun s -> s +. (float n /. t)) acc
                | _, Some (Error e) -> Error e
                | _, None -> Error "worker died")
              (Ok 0.) rs
          in
          let o, u, errs = alternate nrounds measure in
          Printf.eprintf "  %s, %s done\n%!" kname sname;
          (kind, kname, sharing, sname, o, u, errs))
        sharings)
    kinds

let coord_fork, coord_join = Netmcore_process.def_process coordinator

let fmt v = if Float.is_nan v then "—" else if v >= 1e6 then Printf.sprintf "%.2f M/s" (v /. 1e6) else Printf.sprintf "%.0f k/s" (v /. 1e3)

let () =
  (* the structures of every round stay until the end: pools sized for it *)
  let res = run_on_two_pools ~name:"bench-structs" ~bytes:(1024 * 1024 * 1024) coord_fork coord_join in
  let oc = open_out !out_md in
  let p fmt = Printf.fprintf oc fmt in
  p "| case | workers | OCamlnet 4.1.9 | shmpool | speed-up | goal |\n|---|---|---:|---:|---:|---|\n";
  let one = Hashtbl.create 8 in
  List.iter
    (fun (kind, kname, sharing, sname, o, u, errs) ->
      let mo = median o and mu = median u in
      if sharing = One then Hashtbl.replace one kind mu;
      let goal =
        match (kind, sharing) with
        | Find, One -> "≥ 1× (reads no slower)"
        | _, One -> "≥ 3× (writes)"
        | _, Separate -> Printf.sprintf "≥ 1.6× one worker: %.2f×" (mu /. Hashtbl.find one kind)
        | _, Shared -> ""
      in
      p "| %s | %s | %s | %s | %.1f× | %s |\n" kname sname (fmt mo) (fmt mu) (mu /. mo) goal;
      List.iter (fun e -> p "|  error: %s | | | | | |\n" e) errs)
    res;
  close_out oc
