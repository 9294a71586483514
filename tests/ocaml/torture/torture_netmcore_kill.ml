(* Kill torture through Netmcore, as users run the drop-in pool: the master
   creates the pool before Netmcore.run; the first process runs the trials,
   each starting [nworkers] workers (Netmcore_process.start
   ~inherit_resources:`All) on the stamped alloc/free loop, SIGKILLing one
   (its Unix pid published in the mailbox) at a random moment, waiting for
   the others under a deadline (a hang is counted and killed, never waited
   on), then a fresh worker; then the pool must be sound, hold nothing but
   the victim's blocks, and be entirely free after reclaim_dead. *)

open Torture
module M = Shmpool_netmcore.Netmcore_mempool

let suite = "netmcore-kill"
let nworkers = 3
let pool_pages = 1536
let survivor_ops = 1500
let trials = 15 * scale
let deadline = 20.0

(* created by the master before Netmcore.run, inherited by every process *)
let mb = ref (Bigarray.Array1.create Bigarray.int64 Bigarray.c_layout 0)

let api = Torture_mcore.netmcore_api

let worker (pool, slot, ops, tag, s) =
  churn (api pool) !mb (slot * slot_words) ~rng:(Random.State.make [| s |]) ~ops ~tag;
  get !mb ((slot * slot_words) + w_violations) = 0

let worker_fork, worker_join = Netmcore_process.def_process worker

type result = {
  kills : int;
  deadlocks : int;
  violations : int;
  lost : int;
  ops : int;
  ooms : int;
  reclaimed : int;
  recoveries : int;
  messages : string list;
}

let first (pool, seed) =
  let rng = Random.State.make [| seed |] in
  let mb = !mb in
  let sp = Shmpool_netmcore.shmpool pool in
  let kills = ref 0 and deadlocks = ref 0 and violations = ref 0 and lost = ref 0 in
  let ooms = ref 0 and ops = ref 0 and reclaimed = ref 0 and messages = ref [] in
  let violation fmt =
    Printf.ksprintf
      (fun s ->
        if List.length !messages < 5 then messages := s :: !messages;
        incr violations)
      fmt
  in
  (try
     for trial = 1 to trials do
       Bigarray.Array1.fill mb 0L;
       let start i ops =
         Netmcore_process.start ~inherit_resources:`All worker_fork
           (pool, i, ops, Int64.of_int ((trial lsl 4) lor i), Random.State.bits rng)
       in
       let victim = Random.State.int rng nworkers in
       let ids = Array.init nworkers (fun i -> start i (if i = victim then max_int else survivor_ops)) in
       let pid_of i = get mb ((i * slot_words) + w_pid) in
       let vbase = victim * slot_words in
       let tv = now () in
       while get mb (vbase + w_progress) = 0 && now () -. tv < deadline do sleep 0.0002 done;
       sleep (Random.State.float rng 0.004);
       let vpid = pid_of victim in
       if vpid = 0 then (incr deadlocks; violation "trial %d: the victim never started" trial)
       else begin
         kill vpid Sys.sigkill;
         if wait_gone vpid then incr kills else violation "trial %d: the victim survived SIGKILL" trial
       end;
       (* wait for the workers' own word that they finished, with a deadline;
          kill those that hang *)
       let await slots =
         let t = now () in
         while
           List.exists (fun i -> get mb ((i * slot_words) + w_status) <> 1) slots && now () -. t < deadline
         do
           sleep 0.0005
         done;
         List.iter
           (fun i ->
             if get mb ((i * slot_words) + w_status) <> 1 then begin
               incr deadlocks;
               if List.length !messages < 5 then
                 messages := Printf.sprintf "trial %d: worker %d hung (killed)" trial i :: !messages;
               if pid_of i > 0 then (diagnose (pid_of i); kill (pid_of i) Sys.sigkill)
             end)
           slots
       in
       let survivors = List.filter (( <> ) victim) (List.init nworkers Fun.id) in
       await survivors;
       Array.iteri
         (fun i id ->
           let r = Netmcore_process.join worker_join id in
           if i <> victim && r <> Some true then violation "trial %d: worker %d returned no success" trial i)
         ids;
       let fresh = start nworkers survivor_ops in
       await [ nworkers ];
       if Netmcore_process.join worker_join fresh <> Some true then
         violation "trial %d: the fresh worker returned no success" trial;
       for i = 0 to nworkers do
         let b = i * slot_words in
         violations := !violations + get mb (b + w_violations);
         ooms := !ooms + get mb (b + w_ooms);
         ops := !ops + get mb (b + w_progress)
       done;
       (match Shmpool.check sp with
        | [] -> ()
        | l -> violation "trial %d: check: %s" trial (String.concat "; " l));
       let r = Shmpool.reclaim_dead sp in
       reclaimed := !reclaimed + r.pages_freed;
       List.iter
         (fun (pid, pages) ->
           if pages > 0 && pid <> vpid then violation "trial %d: dead process %d still held %d pages" trial pid pages)
         r.dead;
       let s = Shmpool.stats sp in
       if s.free <> s.payload || s.live_blocks <> 0 || s.largest_free <> s.payload then begin
         lost := !lost + max 1 ((s.payload - s.free) / ps);
         violation "trial %d: %d pages not free, %d live blocks, largest run %d of %d" trial
           ((s.payload - s.free) / ps) s.live_blocks s.largest_free s.payload;
         ignore (Shmpool.reclaim_dead sp)
       end
     done
   with e -> violation "first process: %s" (Printexc.to_string e));
  {
    kills = !kills;
    deadlocks = !deadlocks;
    violations = !violations;
    lost = !lost;
    ops = !ops;
    ooms = !ooms;
    reclaimed = !reclaimed;
    recoveries = (Shmpool.stats sp).recoveries;
    messages = List.rev !messages;
  }

let first_fork, first_join = Netmcore_process.def_process first

let run () =
  let t0 = now () in
  mb := mailbox ((nworkers + 1) * slot_words);
  let pool, result, log =
    Torture_mcore.run_first ~name:"torture-netmcore" ~pool_bytes:(pool_pages * ps) first_fork first_join seed
  in
  let check_now = Shmpool.check (Shmpool_netmcore.shmpool pool) in
  let ok, line =
    match result with
    | None -> (false, Printf.sprintf "%d trials, the first process returned nothing (seed %d)" trials seed)
    | Some r ->
        List.iter (fun m -> prerr_endline ("torture " ^ suite ^ ": " ^ m)) r.messages;
        let violations = r.violations + List.length check_now in
        ( r.kills = trials && r.deadlocks = 0 && violations = 0 && r.lost = 0,
          Printf.sprintf
            "%d trials, %d kills, %d deadlocks, %d violations, %d pages lost (%d recoveries, %d pages reclaimed, %d ops, %d OOMs, %.1f s, seed %d)"
            trials r.kills r.deadlocks violations r.lost r.recoveries r.reclaimed r.ops r.ooms (now () -. t0) seed )
  in
  if not ok then Torture_mcore.show_log log;
  report ~suite "%s" line;
  ok

let () = main ~suite run
