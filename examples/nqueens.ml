(* The n-queens puzzle solved by Netmcore worker processes that share their
   findings through netmulticore's structures: a program written the way
   OCamlnet programs are written, against the plain OCamlnet module names.
   examples/dune builds it twice: as is (OCamlnet's modules) and as a copy
   whose only change is a first line [open Shmpool_netmcore] (shmpool's).

   A placement is an [int array]: [b.(c)] is the row of the queen in column
   [c]. Two placements are equivalent when one is a rotation or reflection
   of the other; each class is represented by its smallest member (OCaml's
   [compare]). The program reports the number of classes ("distinct") and
   the number of placements ("total", the sum of the class sizes), e.g. 12
   and 92 for n = 8.

   Modes (the work is split by the row of the first column's queen: worker
   [w] of [k] takes the rows [r] with [r mod k = w]):
   - [-seq]: one process, a Stdlib Hashtbl (the reference);
   - [-sht]: one shared Netmcore_hashtbl; its header holds a Netmcore_mutex
     that makes "is it there? if not, add it" atomic;
   - [-sht2]: two shared tables, split by the representative's first row;
     [replace] of the same key is idempotent, so no mutex is needed;
   - [-cond]: the workers push representatives into a Netmcore_queue and a
     collector (the first process) pops them into a private Hashtbl. The
     queue's header holds a mutex, a condition the collector waits on for
     data and one the workers wait on until the collector opens the gate,
     and the number of workers still running. *)

open Printf

type board = int array

(* Calls [emit b] for every solution with the first queen in row [row0]
   ([b] is reused: copy it to keep it). Rows and both diagonals in use are
   bit sets. *)
let solve n row0 emit =
  let b = Array.make n 0 in
  let rec place col rows up down =
    if col = n then emit b
    else
      for r = 0 to n - 1 do
        let u = r + col and d = r - col + n - 1 in
        if rows land (1 lsl r) = 0 && up land (1 lsl u) = 0 && down land (1 lsl d) = 0 then begin
          b.(col) <- r;
          place (col + 1) (rows lor (1 lsl r)) (up lor (1 lsl u)) (down lor (1 lsl d))
        end
      done
  in
  b.(0) <- row0;
  place 1 (1 lsl row0) (1 lsl row0) (1 lsl (row0 + n - 1))

(* The 8 images of a placement under the symmetries of the square. *)
let images (b : board) =
  let n = Array.length b in
  (* quarter turn: the queen at (column c, row r) goes to (column r, row n-1-c) *)
  let turn b =
    let t = Array.make n 0 in
    Array.iteri (fun c r -> t.(r) <- n - 1 - c) b;
    t
  in
  let flip b = Array.init n (fun c -> b.(n - 1 - c)) in
  let b1 = turn b in
  let b2 = turn b1 in
  let b3 = turn b2 in
  List.concat_map (fun x -> [ x; flip x ]) [ b; b1; b2; b3 ]

(* never [b] itself, which [solve] reuses *)
let representative b = List.fold_left min (Array.copy b) (images b)
let class_size b = List.length (List.sort_uniq compare (images b))

let my_rows n workers w = List.filter (fun r -> r mod workers = w) (List.init n Fun.id)

let report n (distinct, total) = printf "n=%d distinct=%d total=%d\n%!" n distinct total

let pool_size = 64 * 1024 * 1024

let wait_all join pids =
  List.iter (fun pid -> if Netmcore_process.join join pid = None then failwith "a worker failed") pids

(**********************************************************************)

module Sequential = struct
  let run n workers =
    ignore workers;
    let seen = Hashtbl.create 100 in
    for r = 0 to n - 1 do
      solve n r (fun b ->
          let key = representative b in
          if not (Hashtbl.mem seen key) then Hashtbl.add seen key ())
    done;
    report n (Hashtbl.length seen, Hashtbl.fold (fun b () acc -> acc + class_size b) seen 0)
end

(**********************************************************************)

module One_table = struct
  type header = { mutable lock : Netmcore_mutex.mutex }
  type table = (board, unit, header) Netmcore_hashtbl.t_descr

  let worker (pool, (descr : table), n, workers, w) =
    let ht = Netmcore_hashtbl.hashtbl_of_descr pool descr in
    let h = Netmcore_hashtbl.header ht in
    List.iter
      (fun r ->
        solve n r (fun b ->
            let key = representative b in
            Netmcore_mutex.lock h.lock;
            Fun.protect
              ~finally:(fun () -> Netmcore_mutex.unlock h.lock)
              (fun () -> if not (Netmcore_hashtbl.mem ht key) then Netmcore_hashtbl.add ht key ())))
      (my_rows n workers w)

  let worker_fork, worker_join = Netmcore_process.def_process worker

  let main (pool, (n, workers)) =
    let ht = Netmcore_hashtbl.create pool { lock = Netmcore_mutex.dummy () } in
    (* a mutex lives in shared memory: created in place, inside modify *)
    Netmcore_heap.modify (Netmcore_hashtbl.heap ht) (fun mut ->
        (Netmcore_hashtbl.header ht).lock <- Netmcore_mutex.create mut `Normal);
    let descr = Netmcore_hashtbl.descr_of_hashtbl ht in
    let pids =
      List.init workers (fun w ->
          Netmcore_process.start ~inherit_resources:`All worker_fork (pool, descr, n, workers, w))
    in
    wait_all worker_join pids;
    let total = ref 0 in
    Netmcore_hashtbl.iter (fun b () -> total := !total + class_size b) ht;
    report n (Netmcore_hashtbl.length ht, !total);
    Netmcore_mutex.destroy (Netmcore_hashtbl.header ht).lock
end

(**********************************************************************)

module Two_tables = struct
  type table = (board, unit, unit) Netmcore_hashtbl.t_descr

  let worker (pool, ((d1 : table), (d2 : table)), n, workers, w) =
    let ht1 = Netmcore_hashtbl.hashtbl_of_descr pool d1 in
    let ht2 = Netmcore_hashtbl.hashtbl_of_descr pool d2 in
    List.iter
      (fun r ->
        solve n r (fun b ->
            let key = representative b in
            Netmcore_hashtbl.replace (if key.(0) < n / 2 then ht1 else ht2) key ()))
      (my_rows n workers w)

  let worker_fork, worker_join = Netmcore_process.def_process worker

  let main (pool, (n, workers)) =
    let ht1 = Netmcore_hashtbl.create pool () in
    let ht2 = Netmcore_hashtbl.create pool () in
    let descrs = (Netmcore_hashtbl.descr_of_hashtbl ht1, Netmcore_hashtbl.descr_of_hashtbl ht2) in
    let pids =
      List.init workers (fun w ->
          Netmcore_process.start ~inherit_resources:`All worker_fork (pool, descrs, n, workers, w))
    in
    wait_all worker_join pids;
    (* the tables are disjoint by construction *)
    let total = ref 0 in
    let count b () = total := !total + class_size b in
    Netmcore_hashtbl.iter count ht1;
    Netmcore_hashtbl.iter count ht2;
    report n (Netmcore_hashtbl.length ht1 + Netmcore_hashtbl.length ht2, !total)
end

(**********************************************************************)

module Collector = struct
  type header = {
    mutable lock : Netmcore_mutex.mutex;
    mutable data : Netmcore_condition.condition;  (** the queue got items or a worker ended *)
    mutable gate : Netmcore_condition.condition;  (** [opened] became true *)
    mutable waiters : Netmcore_condition.wait_set;
    mutable opened : bool;
    mutable running : int;
  }

  type queue = (board, header) Netmcore_queue.squeue_descr

  let wait_entry q =
    let h = Netmcore_queue.header q in
    Netmcore_heap.modify (Netmcore_queue.heap q) (fun mut ->
        Netmcore_condition.alloc_wait_entry mut h.waiters)

  let worker (pool, (descr : queue), n, workers, w) =
    let q = Netmcore_queue.squeue_of_descr pool descr in
    let h = Netmcore_queue.header q in
    let we = wait_entry q in
    Netmcore_mutex.lock h.lock;
    while not h.opened do
      Netmcore_condition.wait we h.gate h.lock
    done;
    Netmcore_mutex.unlock h.lock;
    List.iter
      (fun r ->
        solve n r (fun b ->
            (* pushed under the lock: the collector cannot miss the signal
               between its emptiness check and its wait *)
            Netmcore_mutex.lock h.lock;
            Netmcore_queue.push (representative b) q;
            Netmcore_mutex.unlock h.lock;
            Netmcore_condition.signal h.data))
      (my_rows n workers w);
    Netmcore_mutex.lock h.lock;
    h.running <- h.running - 1;
    Netmcore_mutex.unlock h.lock;
    Netmcore_condition.signal h.data

  let worker_fork, worker_join = Netmcore_process.def_process worker

  let main (pool, (n, workers)) =
    let dummy =
      {
        lock = Netmcore_mutex.dummy ();
        data = Netmcore_condition.dummy_condition ();
        gate = Netmcore_condition.dummy_condition ();
        waiters = Netmcore_condition.dummy_wait_set ();
        opened = false;
        running = workers;
      }
    in
    let q = Netmcore_queue.create pool dummy in
    let h = Netmcore_queue.header q in
    Netmcore_heap.modify (Netmcore_queue.heap q) (fun mut ->
        h.lock <- Netmcore_mutex.create mut `Normal;
        h.data <- Netmcore_condition.create_condition mut;
        h.gate <- Netmcore_condition.create_condition mut;
        h.waiters <- Netmcore_condition.create_wait_set mut);
    let descr = Netmcore_queue.descr_of_squeue q in
    let pids =
      List.init workers (fun w ->
          Netmcore_process.start ~inherit_resources:`All worker_fork (pool, descr, n, workers, w))
    in
    let we = wait_entry q in
    Netmcore_mutex.lock h.lock;
    h.opened <- true;
    Netmcore_mutex.unlock h.lock;
    Netmcore_condition.broadcast h.gate;
    let seen = Hashtbl.create 100 in
    let finished = ref false in
    while not !finished do
      Netmcore_mutex.lock h.lock;
      while Netmcore_queue.is_empty q && h.running > 0 do
        Netmcore_condition.wait we h.data h.lock
      done;
      (* after the last worker's decrement nothing more is pushed *)
      finished := Netmcore_queue.is_empty q && h.running = 0;
      Netmcore_mutex.unlock h.lock;
      (try
         while true do
           let b = Netmcore_queue.pop_c q in
           if not (Hashtbl.mem seen b) then Hashtbl.add seen b ()
         done
       with Netmcore_queue.Empty -> ())
    done;
    wait_all worker_join pids;
    report n (Hashtbl.length seen, Hashtbl.fold (fun b () acc -> acc + class_size b) seen 0)
end

(**********************************************************************)

let () =
  let n = ref 8 and workers = ref 0 and mode = ref `Seq in
  Arg.parse
    [
      ("-seq", Arg.Unit (fun () -> mode := `Seq), " one process, a private Hashtbl");
      ("-sht", Arg.Unit (fun () -> mode := `Sht), " one shared hashtable and a mutex");
      ("-sht2", Arg.Unit (fun () -> mode := `Sht2), " two shared hashtables, no mutex");
      ("-cond", Arg.Unit (fun () -> mode := `Cond), " a shared queue, a collector, conditions");
      ("-n", Arg.Set_int n, "<n> the board size (default 8)");
      ("-workers", Arg.Set_int workers, "<k> worker processes (default min n 4)");
    ]
    (fun s -> raise (Arg.Bad ("unexpected argument " ^ s)))
    "usage: nqueens [-seq|-sht|-sht2|-cond] [-n <n>] [-workers <k>]";
  let n = !n in
  if n < 4 || n > 14 then (prerr_endline "nqueens: n must be in 4..14"; exit 2);
  let workers = if !workers > 0 then min !workers n else min n 4 in
  let t0 = Unix.gettimeofday () in
  let shared main =
    let fork, join = Netmcore_process.def_process main in
    let pool = Netmcore_mempool.create_mempool pool_size in
    let dir = Filename.concat (Filename.get_temp_dir_name ()) (sprintf "nqueens.%d" (Unix.getpid ())) in
    Netmcore.startup ~socket_directory:dir
      ~first_process:(fun () -> Netmcore_process.start ~inherit_resources:`All fork (pool, (n, workers)))
      ();
    ignore join;
    Netmcore.release pool
  in
  (match !mode with
  | `Seq -> Sequential.run n workers
  | `Sht -> shared One_table.main
  | `Sht2 -> shared Two_tables.main
  | `Cond -> shared Collector.main);
  printf "time=%.3f\n%!" (Unix.gettimeofday () -. t0)
