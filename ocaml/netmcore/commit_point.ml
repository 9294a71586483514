(* Test-only staged death for the shared structures: each operation calls
   [reached name] at the point named (between its commit and the updates
   of derived fields, or in the middle of building a replacement), so a
   test can kill the process exactly there. Off (one indirect call of
   [ignore]) unless a test sets [hook]. *)

let hook : (string -> unit) ref = ref ignore
let reached name = !hook name
