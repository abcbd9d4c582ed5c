from distill_client.cli import main

main()
