from launch.app import main

main()
